"""The docs tell the truth about the repository: links resolve, README's commands are CI's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import yaml

REPO = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest'
DEMO_RUN = "python -m trainer experiment=demo"
# Where code and config may name a doc in a comment or docstring (tests are left out: they
# name missing paths on purpose).
CODE_PLACES = ("trainer", "scripts", "conf", "k8s", ".ci", "Dockerfile", "setup.py")
# Without git (an unpacked archive), what a checkout never holds (see .gitignore): top-level
# folders of runs, data and builds, and caches anywhere.
NOT_IN_REPO = {"data", "outputs", "multirun", "runs", "build", "dist", "venv"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"\b(?:href|src)\s*=\s*\"([^\"]+)\"")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# `docs/...` or `*.md`, not inside a URL or a longer path (nothing path-like right before it).
DOC_PATH = re.compile(r"(?<![\w./:-])(?:docs/[\w./-]*\w|[\w./-]*\w\.md)\b")


def repo_files() -> set[str]:
    """Paths (relative, '/'-separated) of the files the repository holds: tracked or about to
    be (untracked, not ignored). Falls back to walking the tree when git is not there."""
    if shutil.which("git") and (REPO / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return {p for p in listed.split("\0") if p and (REPO / p).is_file()}
    found = set()
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        hidden = any(p.startswith(".") and p != ".ci" for p in parts[:-1])
        skipped = (
            parts[0] in NOT_IN_REPO
            or parts[0] == ".git"
            or any(p == "__pycache__" or p.endswith(".egg-info") for p in parts)
        )
        if path.is_file() and not hidden and not skipped:
            found.add("/".join(parts))
    return found


def in_repo(relative: str, files: set[str]) -> bool:
    """Whether `relative` is a file of the repository, or a folder holding some."""
    return relative in files or any(f.startswith(relative.rstrip("/") + "/") for f in files)


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in `text`, code blocks and spans left out."""
    # Blank the code out but keep its newlines, so line numbers still match the file.
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = INLINE_CODE.sub("", text)
    links = []
    for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK):
        for match in pattern.finditer(text):
            links.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return sorted(links)


def resolve(source: str, target: str) -> str | None:
    """The repository-relative path a relative link from file `source` points at, anchors and
    queries dropped; None for a link that leaves the repository."""
    path = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
    base = REPO if path.startswith("/") else (REPO / source).parent
    resolved = (base / path.lstrip("/")).resolve()
    try:
        return resolved.relative_to(REPO).as_posix()
    except ValueError:
        return None


def broken_links(files: set[str]) -> list[str]:
    broken = []
    for source in sorted(f for f in files if f.lower().endswith(".md")):
        for line, target in markdown_links((REPO / source).read_text(encoding="utf-8")):
            if SCHEME.match(target) or target.startswith("#"):
                continue  # web links, mail, and anchors within the same page
            relative = resolve(source, target)
            if relative is None:
                broken.append(f"{source}:{line}: {target} leaves the repository")
            elif not in_repo(relative, files):
                broken.append(f"{source}:{line}: {target} -> no {relative} in the repository")
    return broken


def test_every_relative_link_in_markdown_resolves_to_a_repository_file():
    files = repo_files()
    assert any(f.lower().endswith(".md") for f in files), "no Markdown files found"
    broken = broken_links(files)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_doc_named_in_code_and_config_exists():
    files = repo_files()
    code = sorted(f for f in files if f.split("/")[0] in CODE_PLACES)
    assert any(f.startswith("trainer/") for f in code), "the package's files were not found"
    missing = []
    for source in code:
        data = (REPO / source).read_bytes()
        if b"\0" in data:
            continue  # a binary file: no comments to read
        text = data.decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for name in DOC_PATH.findall(line):
                if not in_repo(name, files):
                    missing.append(f"{source}:{number}: names {name}, not in the repository")
    assert not missing, "\n".join(missing)


def first_code_block(markdown: str) -> tuple[str, list[str]]:
    """What comes before README's first fenced block, and the block's command lines."""
    match = FENCE.search(markdown)
    assert match, "README.md has no code block"
    body = match.group(0).split("\n")[1:-1]
    commands = [line.strip() for line in body if line.strip() and not line.lstrip().startswith("#")]
    return markdown[: match.start()], commands


def test_readme_opens_with_the_demo_command_and_ci_runs_its_test_command():
    before, commands = first_code_block((REPO / "README.md").read_text(encoding="utf-8"))
    assert "\n## " not in before, "README.md must open with its two commands, before any section"
    assert len(commands) == 2, f"README's first code block should hold two commands: {commands}"
    demo, tests = commands
    # Command 1: set up (install, generate the demo data), then run the demo experiment.
    assert demo.startswith("pip install -e . && "), demo
    assert demo.endswith(" && " + DEMO_RUN), demo
    assert tests == TEST_COMMAND, tests

    assert ci_commands() == commands, ".ci/run does not run README's two commands as written"


def ci_commands() -> list[str]:
    """The commands .ci/run runs: it reads them from README.md's first code block at run time
    (the `commands=$(awk ...)` assignment), so run that very assignment and print its result."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    start = ci.index("commands=$(awk")
    end = ci.index("README.md)", start) + len("README.md)")
    script = ci[start:end] + '\nprintf "%s\\n" "$commands"'
    result = subprocess.run(
        ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_readme_demo_generates_the_folders_the_demo_preset_reads():
    _, commands = first_code_block((REPO / "README.md").read_text(encoding="utf-8"))
    generated = re.search(r"python -m trainer\.synthetic (\S+)", commands[0])
    assert generated, f"command 1 does not generate the demo data: {commands[0]}"
    root = generated.group(1).rstrip("/")
    preset = yaml.safe_load((REPO / "conf" / "data" / "demo.yaml").read_text(encoding="utf-8"))
    # trainer.synthetic writes ROOT/train and ROOT/test; the preset must read exactly those.
    assert (preset["train_dir"], preset["test_dir"]) == (f"{root}/train", f"{root}/test")


def test_readme_exit_code_table_lists_every_exit_code_the_trainer_defines():
    from trainer import ExitCode

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}


def config_keys(node: type, prefix: str = "") -> set[str]:
    """Every leaf key of the config schema (trainer/config.py), dotted: `data.train_dir`, ..."""
    import dataclasses

    keys = set()
    for f in dataclasses.fields(node):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys |= config_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def test_readme_configuration_table_lists_every_config_key_and_no_other():
    from trainer.config import Config

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", table, re.MULTILINE))
    assert documented == config_keys(Config), (
        f"missing from README: {sorted(config_keys(Config) - documented)}; "
        f"not in trainer/config.py: {sorted(documented - config_keys(Config))}"
    )
