# paddler-agent: polls llama.cpp servers, answers HAProxy's agent-check, serves the management
# API (/health, /api/v1/agents, /metrics, dashboard) and Envoy's endpoint picker.
#
# Build from the repository root (see docs/containers.md):
#   docker build --network host -f docker/agent.Dockerfile -t paddler-agent .
# Run next to HAProxy, with the fleet file mounted at /etc/paddler/fleet.yaml:
#   docker run --network host -v $PWD/docker/fleet.yaml:/etc/paddler/fleet.yaml:ro paddler-agent
#
# Build arguments:
#   BASE                   any Debian-like image with Python >= 3.11 in apt (default debian:bookworm-slim)
#   APT_CHECK_VALID_UNTIL  "false" for archive snapshots whose Release files have expired
#   EXTRA_CA_CERTS         PEM text of extra CAs that pip must trust during the build only
#                          (a TLS-intercepting proxy); nothing of it is left in the image

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
    PIP_CERT="$bundle" pip install --no-cache-dir --disable-pip-version-check /src; \
    install -m 0755 /src/docker/paddler-container.py /usr/local/bin/paddler-container; \
    rm -rf /src /tmp/build-ca-bundle.pem; \
    paddler-agent --help > /dev/null

USER paddler
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["paddler-container", "health", "agent"]
ENTRYPOINT ["paddler-container", "agent"]
CMD []
