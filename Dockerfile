# The trainer image: TensorFlow's official GPU image + this project + ResNet50's ImageNet weights.
#   docker build -t IMAGE .                          (--build-arg FETCH_WEIGHTS=0 to skip the weights)
#   docker run --rm IMAGE experiment=demo ...        (arguments are Hydra overrides)
# The base is an argument only so tests can build on a stand-in where this one cannot be pulled
# (tests/containers.py); users keep the default.
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ARG FETCH_WEIGHTS=1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KERAS_HOME=/opt/keras \
    TRAINER_CACHE_DIR=/scratch/cache

RUN groupadd --gid 10001 trainer \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin trainer \
    && mkdir -p /scratch && chown 10001:10001 /scratch

WORKDIR /opt/trainer
COPY setup.py pyproject.toml README.md ./
COPY trainer ./trainer
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
# A regular (not editable) install: the configs ship inside the package as trainer.conf.
# Then Keras' own download of the ImageNet "notop" weights into its cache, so pods never
# download at run time (clusters are often offline): model.weights=imagenet finds the file in
# $KERAS_HOME/models.
RUN pip install --no-cache-dir . \
    && if [ "$FETCH_WEIGHTS" = "1" ]; then \
      python -c "import keras; keras.applications.ResNet50(include_top=False, weights='imagenet')"; \
    fi

USER 10001:10001
WORKDIR /scratch
# Exec form: python is PID 1 and receives SIGTERM itself (the trainer handles it).
ENTRYPOINT ["python", "-m", "trainer"]
