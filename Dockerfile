# The rtmanager service image.
#
#   docker build -t galaxy/rtmanager .
#
# It manages engines on the host's Docker engine through the mounted socket,
# as a non-root user (uid 10001) that needs the socket's group:
#
#   docker run -d --name rtmanager \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v /var/lib/galaxy/games:/var/lib/galaxy/games \
#     -e RTMANAGER_POSTGRES_DSN=... -e RTMANAGER_REDIS_URL=... \
#     -e RTMANAGER_GRPC_ADDR=0.0.0.0:50051 -e RTMANAGER_AUTH_TOKENS=@/run/secrets/tokens \
#     -e RTMANAGER_TLS_CERT=/run/secrets/tls.crt -e RTMANAGER_TLS_KEY=/run/secrets/tls.key \
#     -p 50051:50051 galaxy/rtmanager
#
# - Apply migrations first (or from an init container) with the same
#   settings: `docker run --rm -e RTMANAGER_POSTGRES_DSN=... galaxy/rtmanager migrate`.
# - The state root must be the same path inside and outside, and writable by
#   uid 10001: engines bind-mount host paths that the service creates.
#   Engines run as the service's own uid (RTMANAGER_ENGINE_USER=10001:10001)
#   so that they can write the state directories it makes: a non-root
#   service cannot give them to another user.
# - Off loopback, tokens are only accepted over TLS: without RTMANAGER_TLS_*
#   the server refuses to start unless RTMANAGER_ALLOW_CLEARTEXT_TOKENS=true
#   says the network in front of it is trusted (TLS ending at a proxy).
# - HEALTHCHECK runs `rtmanager health` (gRPC health, no token needed); with
#   TLS on, override it with `--health-cmd "rtmanager health --tls-ca ..."`.
#   The same command is an exec probe for an orchestrator.
#
# BASE is any Debian bookworm image with python3 (3.11) and python3-venv; the
# default is the official Python image. With no package index reachable,
# put wheels in ./wheelhouse (`pip wheel -c constraints.txt -w wheelhouse .
# setuptools wheel async-timeout`: the project, what builds it, and what
# redis-py needs on Python older than 3.11.3 such as bookworm's)
# and build with --build-arg PIP_INSTALL_ARGS="--no-index --find-links /wheelhouse".
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG PIP_INSTALL_ARGS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The wheelhouse is optional: constraints.txt keeps this COPY valid without it.
COPY constraints.txt wheelhouse* /wheelhouse/
COPY pyproject.toml constraints.txt README.md ./
COPY rtmanager ./rtmanager
RUN python3 -m venv /opt/rtmanager \
    && /opt/rtmanager/bin/pip install ${PIP_INSTALL_ARGS} -c constraints.txt . \
    && /opt/rtmanager/bin/rtmanager --help >/dev/null

FROM ${BASE}
ENV PATH=/opt/rtmanager/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RTMANAGER_MIGRATIONS_DIR=/app/migrations \
    RTMANAGER_GRPC_ADDR=0.0.0.0:50051 \
    RTMANAGER_METRICS_ADDR=0.0.0.0:9464 \
    RTMANAGER_ENGINE_USER=10001:10001
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rtmanager
COPY --from=build /opt/rtmanager /opt/rtmanager
COPY migrations /app/migrations
WORKDIR /app
USER 10001:10001
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=6s --start-period=60s --retries=3 \
    CMD ["rtmanager", "health", "--timeout", "5"]
ENTRYPOINT ["rtmanager"]
CMD ["serve"]
