# paddler-llama-server: llama-server from Debian's llama.cpp-tools package, with the project's
# tiny test model (devstack/model.py, random weights, ~0.5 MB) written at build time. For tests
# and demos of the balancer; mount a real model and set LLAMA_ARG_MODEL to serve one.
#
# Build from the repository root (see docs/containers.md):
#   docker build --network host -f docker/llama-server.Dockerfile -t paddler-llama-server .
# Run (llama-server reads LLAMA_ARG_* variables; any llama-server option can follow the image):
#   docker run --network host -e LLAMA_ARG_PORT=18081 -e LLAMA_ARG_N_PARALLEL=4 paddler-llama-server
#
# llama.cpp-tools is in Debian sid (not in bookworm). Build arguments as in agent.Dockerfile
# (BASE, APT_CHECK_VALID_UNTIL, EXTRA_CA_CERTS; pip fetches gguf in the model stage only).

ARG BASE=debian:sid-slim

# Stage 1: write the model with llama.cpp's own GGUF writer (PyPI gguf); nothing of it is kept
# but the model file.
FROM ${BASE} AS model
ARG APT_CHECK_VALID_UNTIL=true
ARG EXTRA_CA_CERTS=
RUN set -eux; \
    apt-get -o Acquire::Check-Valid-Until="$APT_CHECK_VALID_UNTIL" update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-numpy ca-certificates; \
    python3 -m venv --system-site-packages /opt/model
COPY devstack/model.py /build/model.py
RUN set -eux; \
    bundle=/etc/ssl/certs/ca-certificates.crt; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
        bundle=/tmp/build-ca-bundle.pem; \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$EXTRA_CA_CERTS"; } > "$bundle"; \
    fi; \
    PIP_CERT="$bundle" /opt/model/bin/pip install --no-cache-dir --disable-pip-version-check gguf==0.19.0; \
    mkdir -p /models; \
    /opt/model/bin/python /build/model.py /models/tiny.gguf

# Stage 2: llama-server and the model.
FROM ${BASE}
ARG APT_CHECK_VALID_UNTIL=true
RUN set -eux; \
    apt-get -o Acquire::Check-Valid-Until="$APT_CHECK_VALID_UNTIL" update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends llama.cpp-tools curl; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    useradd --uid 10002 --home-dir /nonexistent --shell /usr/sbin/nologin llama; \
    llama-server --version
COPY --from=model /models/tiny.gguf /models/tiny.gguf

# Loopback by default: with host networking the balancer reaches it on 127.0.0.1. Metrics on,
# since the tests (and operators) watch llamacpp:requests_deferred.
ENV LLAMA_ARG_MODEL=/models/tiny.gguf \
    LLAMA_ARG_HOST=127.0.0.1 \
    LLAMA_ARG_PORT=8080 \
    LLAMA_ARG_N_PARALLEL=2 \
    LLAMA_ARG_CTX_SIZE=4096 \
    LLAMA_ARG_THREADS=1 \
    LLAMA_ARG_ENDPOINT_METRICS=1 \
    LLAMA_ARG_ALIAS=llama

USER llama
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS "http://${LLAMA_ARG_HOST}:${LLAMA_ARG_PORT}/health" || exit 1
ENTRYPOINT ["llama-server"]
CMD ["--no-warmup"]
