# Floorhand controller image (docs/deployment.md, "Container").
#
#   podman build -t floorhand:0.1.0 .          # or: docker build -t floorhand:0.1.0 .
#   podman run -d --name floorhand -p 8080:8080 \
#     -v /etc/floorhand/site.toml:/etc/floorhand/site.toml:ro \
#     -v floorhand-journal:/var/lib/floorhand floorhand:0.1.0
#
# Slim Python base, the wheel in a virtualenv, a non-root user, the journal on a volume, a
# health check on /api/v1/ready. tests/integration/test_container.py runs this file's
# ENTRYPOINT, CMD, ENV and HEALTHCHECK outside a container (it parses them from here).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: the wheel
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller/ controller/
COPY devices/ devices/
COPY simulators/ simulators/
COPY dashboards/web/ dashboards/web/
COPY firmware-configs/plc/ firmware-configs/plc/
RUN python3 -m pip wheel --no-cache-dir --no-deps -w /dist .

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
# Extras of the wheel to install (docs/deployment.md, "Extras"): influxdb2 for the InfluxDB
# 2.x/3.x history backend; empty for the core install (influxdb1, sqlite, none).
ARG EXTRAS=influxdb2

# A fixed numeric uid (10001, also in USER below), so that runAsNonRoot checks and a host-side
# chown of the secret files work.
RUN groupadd --system --gid 10001 floorhand \
 && useradd --system --uid 10001 --gid floorhand --home-dir /var/lib/floorhand \
      --shell /usr/sbin/nologin floorhand \
 && install -d -o floorhand -g floorhand -m 0750 /var/lib/floorhand \
 && install -d -m 0755 /etc/floorhand
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/floorhand \
 && wheel="$(ls /tmp/dist/floorhand-*.whl)" \
 && /opt/floorhand/bin/pip install --no-cache-dir "${wheel}${EXTRAS:+[${EXTRAS}]}" \
 && rm -rf /tmp/dist
COPY deploy/healthcheck.py /usr/local/lib/floorhand/healthcheck.py

# The API listens on every interface of the container (publish it with -p); the journal goes
# to $STATE_DIRECTORY/journal.sqlite unless the site file or FLOORHAND_JOURNAL names another
# path (a relative one resolves against $STATE_DIRECTORY). Logs go to stderr.
ENV FLOORHAND_API_BIND=0.0.0.0:8080
ENV STATE_DIRECTORY=/var/lib/floorhand
ENV PYTHONUNBUFFERED=1

WORKDIR /var/lib/floorhand
# Created above owned by the floorhand user: a new named volume starts with that owner.
VOLUME ["/var/lib/floorhand"]
USER 10001:10001
EXPOSE 8080

# Ready = journal open, broker session up, API serving (200). The start period covers a
# broker that comes up after the controller.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/floorhand/bin/python", "/usr/local/lib/floorhand/healthcheck.py"]

# floorhand handles SIGTERM itself (STOP to the PLCs, exit within 5 s): give the container
# a stop timeout above that (compose: stop_grace_period 15s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/floorhand/bin/floorhand"]
CMD ["run", "/etc/floorhand/site.toml"]
