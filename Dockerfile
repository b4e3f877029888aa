# syntax=docker/dockerfile:1
#
# dpgan-agent image: one peer per container.
#
#   docker build -t dpgan-agent:0.1.0 .                                     # CPU (default)
#   docker build --build-arg VARIANT=gpu -t dpgan-agent:0.1.0-gpu .         # CUDA (run with --gpus all)
#
# VARIANT picks the PyTorch wheel index: cpu -> the CPU-only wheels (about 200 MB instead of several GB),
# gpu -> the CUDA 13.0 wheels, which bundle the CUDA runtime, so both variants share the same slim base and
# only the host's NVIDIA driver (>= 580 for CUDA 13) is needed. TORCH_INDEX_URL overrides the choice, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 for an older driver.
#
# Local torch wheels: put a torch wheel and its dependencies in wheels/ (ignored by git), e.g.
# `pip download torch==2.13.0 -d wheels`, and the build installs torch from there (--no-index) instead of
# an index (a +cpu wheel serves only VARIANT=cpu); without one, nothing changes. scripts/container_e2e.sh
# builds this way, where no PyTorch index can be reached.
#
# PID 1: tini runs as PID 1 and forwards SIGTERM/SIGINT to dpgan-agent, which stops at a round boundary,
# checkpoints and exits 0. Without it the agent itself would be PID 1, and the kernel ignores a signal sent
# to PID 1 that has no handler installed: a stop that arrives while the agent is still importing torch (before
# its handlers exist) would be dropped until the runtime's SIGKILL. tini also reaps zombies. Kubernetes has no
# --init switch, so the init lives in the image (compose therefore does not set `init: true`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Optional local wheels: the glob matches nothing when wheels/ is absent, and one source that always
# exists (pyproject.toml) keeps COPY valid then for every builder (BuildKit, buildah/podman, classic).
COPY pyproject.toml wheel[s] /wheels/
# torch first, pinned, from wheels/ or the variant's index: `pip install .` alone would pull the multi-GB
# CUDA build.
RUN case "${VARIANT}" in \
      cpu) default_index=https://download.pytorch.org/whl/cpu; not_for_variant="" ;; \
      gpu) default_index=https://download.pytorch.org/whl/cu130; not_for_variant="*+cpu*" ;; \
      *) echo "VARIANT must be cpu or gpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && if [ -n "$(find /wheels -maxdepth 1 -name "torch-${TORCH_VERSION}*.whl" ! -name "${not_for_variant}")" ]; then \
         pip install --no-cache-dir --no-index --find-links /wheels "torch==${TORCH_VERSION}"; \
       else \
         pip install --no-cache-dir --index-url "${TORCH_INDEX_URL:-${default_index}}" "torch==${TORCH_VERSION}"; \
       fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip install --no-cache-dir . \
    && python -c "import agent, torch; print('dpgan-agent', agent.__version__, 'torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="dpgan-agent" \
      org.opencontainers.image.description="Coordinator-free peer agent that trains GANs with DPOSG over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.dpgan.variant="${VARIANT}"
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=0.19.0-*" \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 dpgan \
    && useradd --system --no-log-init -l --uid 10001 --gid dpgan --create-home --home-dir /home/dpgan dpgan \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/dpgan \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/dpgan-pki \
    && install -d -m 0755 /etc/dpgan /etc/dpgan-tls
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DPGAN_TLS_CERT=/etc/dpgan-tls/tls.crt \
    DPGAN_TLS_KEY=/etc/dpgan-tls/tls.key \
    DPGAN_TLS_CA=/etc/dpgan-tls/ca.crt
WORKDIR /var/lib/dpgan
USER 10001:10001
# 5000/tcp: gossip gRPC and the gRPC health service; 5353/udp: mDNS discovery (_dpgan._tcp.local.).
EXPOSE 5000/tcp 5353/udp
VOLUME ["/var/lib/dpgan"]
# Mutual TLS (docs/security.md): by default the node's certificate, key and the cluster CA are mounted at
# /etc/dpgan-tls as tls.crt, tls.key and ca.crt (the layout of a Kubernetes TLS Secret); the health check
# reads the same paths from DPGAN_TLS_*. After the last iteration the agent keeps serving its results
# (--when-finished serve) instead of exiting into a restart loop.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "agent.node.healthcheck", "--address", "127.0.0.1:5000", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "dpgan-agent"]
CMD ["--listen", "0.0.0.0:5000", "--advertise", "auto", "--out", "/var/lib/dpgan", "--discovery", "mdns", "--resume", \
     "--tls-cert", "/etc/dpgan-tls/tls.crt", "--tls-key", "/etc/dpgan-tls/tls.key", "--tls-ca", "/etc/dpgan-tls/ca.crt", \
     "--when-finished", "serve"]
