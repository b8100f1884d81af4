# The gateway image: `docker build -t gateway .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Installed in place so that the request path can be compiled with mypyc beside its sources
# (gateway/native.py); gcc and mypy are there for the build only. Should the build fail, the
# image still works, interpreted (its log line and /stats say which).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir -e . "mypy>=2.4,<2.5" \
 && (python -m gateway.compile || true) \
 && pip uninstall -y mypy \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* /app/build
EXPOSE 10060 10061
# The admin listener binds all interfaces inside the container; publish it only where wanted.
ENV GATEWAY_ADMIN_LISTEN=0.0.0.0:10061
USER nobody
ENTRYPOINT ["gateway"]
