# paddler-haproxy: HAProxy with the paddler.lua bridge. The config is rendered by
# `paddler-gen haproxy --check` at every container start from the fleet file (mounted at
# /etc/paddler/fleet.yaml, or its YAML text in PADDLER_FLEET_YAML), validated by this image's
# own haproxy -c, then HAProxy runs in the foreground as the unprivileged `haproxy` user.
#
# Build from the repository root (see docs/containers.md):
#   docker build --network host -f docker/haproxy.Dockerfile -t paddler-haproxy .
# Run next to paddler-agent:
#   docker run --network host -v $PWD/docker/fleet.yaml:/etc/paddler/fleet.yaml:ro paddler-haproxy
#
# Debian sid's HAProxy (3.2 when this was written; the host tests use Debian 12's 2.6). Build
# arguments as in agent.Dockerfile (BASE, APT_CHECK_VALID_UNTIL, EXTRA_CA_CERTS). A fleet
# `balancer.stats_socket` must be under /run/haproxy (writable by the haproxy user).

ARG BASE=debian:sid-slim
FROM ${BASE}

ARG APT_CHECK_VALID_UNTIL=true
ARG EXTRA_CA_CERTS=
ENV PATH=/opt/paddler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PADDLER_RUN_DIR=/tmp/paddler

RUN set -eux; \
    apt-get -o Acquire::Check-Valid-Until="$APT_CHECK_VALID_UNTIL" update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy python3 python3-venv ca-certificates; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    python3 -m venv /opt/paddler; \
    mkdir -p /run/haproxy; \
    chown haproxy:haproxy /run/haproxy; \
    haproxy -vv | grep -E '^HAProxy version|USE_LUA=1'

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
    PIP_CERT="$bundle" pip install --no-cache-dir --disable-pip-version-check /src; \
    install -m 0755 /src/docker/paddler-container.py /usr/local/bin/paddler-container; \
    rm -rf /src /tmp/build-ca-bundle.pem; \
    paddler-gen haproxy --install-lua > /dev/null; \
    paddler-gen haproxy --check > /dev/null

USER haproxy
# SIGUSR1: soft stop, running requests and streams finish (within docker stop's timeout).
STOPSIGNAL SIGUSR1
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["paddler-container", "health", "haproxy"]
ENTRYPOINT ["paddler-container", "haproxy"]
CMD []
