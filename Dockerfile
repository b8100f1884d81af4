# The gateway image: `docker build -t gateway .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .
EXPOSE 10060 10061
# The admin listener binds all interfaces inside the container; publish it only where wanted.
ENV GATEWAY_ADMIN_LISTEN=0.0.0.0:10061
USER nobody
ENTRYPOINT ["gateway"]
