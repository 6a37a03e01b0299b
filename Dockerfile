# The rtmanager service image. It manages engines on the host's Docker engine
# through a mounted socket:
#   docker run -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/lib/galaxy/games:/var/lib/galaxy/games \
#     -e RTMANAGER_POSTGRES_DSN=... -e RTMANAGER_REDIS_URL=... \
#     -e RTMANAGER_GRPC_ADDR=0.0.0.0:50051 -e RTMANAGER_AUTH_TOKENS=@/run/secrets/tokens \
#     -e RTMANAGER_TLS_CERT=/run/secrets/tls.crt -e RTMANAGER_TLS_KEY=/run/secrets/tls.key \
#     galaxy/rtmanager
# Off loopback, tokens are only accepted over TLS: without RTMANAGER_TLS_* the
# server refuses to start unless RTMANAGER_ALLOW_CLEARTEXT_TOKENS=true says the
# network in front of it is trusted (TLS ending at a proxy or mesh sidecar).
# The state root must be the same path inside and outside: engines bind-mount
# host paths that the service creates.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RTMANAGER_MIGRATIONS_DIR=/app/migrations

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY rtmanager ./rtmanager
COPY migrations ./migrations
RUN pip install -c constraints.txt . && rtmanager --help >/dev/null

EXPOSE 50051 9464
ENTRYPOINT ["rtmanager"]
CMD ["serve"]
