# jmoshi-server on a Linux box with an NVIDIA GPU: `docker compose up` (see docs/deploy.md).
#
# Base: Debian's slim Python 3.11, not an nvidia/cuda image. PyPI's torch wheels carry their own
# CUDA 12.8 runtime, cuBLAS and cuDNN (the nvidia-* wheels), and the NVIDIA container runtime
# mounts the host driver (libcuda) in at run time, so a CUDA base image would only add gigabytes
# of libraries nothing loads. The host needs an NVIDIA driver new enough for CUDA 12.8 and the
# NVIDIA Container Toolkit.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# moshi torch.compile()s a few small fusions; Triton builds a little C helper for them at run
# time, which needs a C compiler. Nothing else needs system packages (sphn bundles Opus).
# Not pinned: Debian's stable updates are security fixes, and pinned versions vanish from the mirror.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so editing the code does not reinstall the
# ~4 GB of torch and CUDA wheels: this layer is rebuilt only when the dependencies change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the server itself (its dependencies are already there).
COPY README.md ./
COPY static ./static
COPY jmoshi_server ./jmoshi_server
RUN pip install --no-deps .

# Run as an ordinary user. The weights are not in the image: they download on first start into
# the Hugging Face cache volume (about 16 GB, once). /data holds the generated certificate.
# The numeric id lets a runtime check "not root" without reading /etc/passwd.
RUN useradd --create-home --uid 1000 --user-group jmoshi \
    && mkdir -p /cache/huggingface /data \
    && chown 1000:1000 /cache/huggingface /data
USER 1000:1000
# MALLOC_ARENA_MAX: with glibc's default arenas per thread, RSS crept up ~0.1 MB per session
# over a 30-minute soak; with 2 it levelled off (docs/faults.md).
ENV HF_HOME=/cache/huggingface \
    JMOSHI_HOST=0.0.0.0 \
    JMOSHI_DATA_DIR=/data \
    MALLOC_ARENA_MAX=2
VOLUME ["/cache/huggingface", "/data"]

EXPOSE 8998

# Ready once the model is loaded. The first start downloads ~16 GB (about an hour at 40 Mbit/s):
# failures during the start period do not count, and the first success ends it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=90m --retries=3 \
    CMD ["python", "-m", "jmoshi_server.healthcheck"]

# Settings come from JMOSHI_* variables (every flag has one), not flags here: a flag would
# silently override the variable of the same name from the env file.
ENTRYPOINT ["jmoshi-server"]
CMD []
