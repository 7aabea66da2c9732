# Mailroom: multi-stage build, small non-root runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY config config
COPY migrations migrations
COPY src src
RUN cargo build --release --bin mailroom && strip target/release/mailroom

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /data mailroom \
 && mkdir -p /data && chown mailroom /data
COPY --from=build /src/target/release/mailroom /usr/local/bin/mailroom
USER mailroom
WORKDIR /data
ENV MAILROOM_LISTEN=0.0.0.0:8080 \
    MAILROOM_DATA_DIR=/data \
    MAILROOM_LOG_FORMAT=json
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["mailroom"]
CMD ["serve"]
