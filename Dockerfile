# riskd: the scoring daemon on its embedded defaults (rules/ and models/ baked in,
# SQLite + keyring under /var/lib/riskd, in-process features unless RISKD_REDIS_URL is set).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 riskd \
 && useradd --system --uid 10001 --gid riskd --home-dir /var/lib/riskd --create-home riskd

WORKDIR /opt/riskd
COPY pyproject.toml README.md ./
COPY riskd ./riskd
COPY protos ./protos
COPY rules ./rules
COPY models ./models
RUN pip install . \
 && riskd rules check rules \
 && riskd rules test rules

USER riskd
ENV RISKD_RULES_DIR=/opt/riskd/rules \
    RISKD_MODELS_DIR=/opt/riskd/models \
    RISKD_DATA_DIR=/var/lib/riskd
VOLUME ["/var/lib/riskd"]
EXPOSE 50051 9464

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["riskd", "health", "--target", "127.0.0.1:50051"]

# Off loopback the daemon refuses plaintext: mount certificates and set RISKD_TLS_CERT,
# RISKD_TLS_KEY (and RISKD_TLS_CLIENT_CA for mutual TLS), plus RISKD_HEALTH_CA (and
# RISKD_HEALTH_SERVER_NAME when the server certificate does not name 127.0.0.1) so the
# health check above can connect; with mutual TLS also RISKD_HEALTH_CERT and
# RISKD_HEALTH_KEY, a client certificate the client CA signed (no role needed: the
# health service is open to anyone). `riskd serve` ignores these client variables.
# Callers and roles come from an [auth] table in a config file passed as RISKD_CONFIG.
# /metrics (9464) is plain HTTP without credentials on the listen address (0.0.0.0 here):
# set RISKD_METRICS_HOST to the pod's internal address (or 127.0.0.1 with a sidecar
# scraper) where callers can reach the pod.
# On SIGTERM health turns NOT_SERVING for RISKD_DRAIN_NOTICE_MS (1 s) before the port
# stops, then in-flight calls get RISKD_GRACE_S (10 s): stop with a longer timeout. A
# database down, locked or hung at the stop adds the decision log's flush and spill
# (about 35 s measured; up to ~50 s, with RISKD_SCORE_WORKERS too: the workers stop
# beside the gRPC process's own close): give `docker stop -t 120`
# (terminationGracePeriodSeconds: 120), or a kill before the spill loses the decisions
# and uncounted orders still queued (README: What a crash can lose).
CMD ["riskd", "serve", "--listen", "0.0.0.0:50051"]
