# Multi-stage build of the `ottomato` image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY actors actors
COPY src src
RUN cargo build --release --locked --bin ottomato

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 ottomato
COPY --from=build /src/target/release/ottomato /usr/local/bin/ottomato
USER ottomato
ENTRYPOINT ["ottomato"]
CMD ["--help"]
