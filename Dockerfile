# syntax=docker/dockerfile:1
# Baton's image: the `baton` daemon and the two example workers (`timer_worker`, the Camel
# example's timer route, and `kafka_bridge`), built with every store (file, etcd, Kubernetes).
# The runtime stage is distroless: the binaries and CA certificates on glibc, no shell, no
# package manager, a non-root user.
#
#   docker build -t baton:0.1.0 .
#   docker run --rm baton:0.1.0 --help

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# protoc: etcd-client compiles etcd's protos. make, g++, cmake: librdkafka, built from source by
# rdkafka-sys for the Kafka bridge.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler cmake make g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# zlib is linked in statically: the runtime image has no libz.
ENV LIBZ_SYS_STATIC=1
# --locked: exactly the versions of Cargo.lock, or fail.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --features full,kubernetes \
        --bin baton --example timer_worker --example kafka_bridge \
 && install -D -m 0755 -t /out target/release/baton \
        target/release/examples/timer_worker target/release/examples/kafka_bridge

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/baton /out/timer_worker /out/kafka_bridge /usr/local/bin/
# distroless' `nonroot` user; the Kubernetes manifests run as the same UID.
USER 65532:65532
# gRPC (loopback by default), health-only gRPC for probes, Prometheus metrics.
EXPOSE 50051 50052 9090
ENTRYPOINT ["/usr/local/bin/baton"]
CMD ["run"]
