# syntax=docker/dockerfile:1
# The mTLS proxy image: `cargo xtask images` builds it from the workspace root
# (`docker build -f images/proxy.Dockerfile .`). Multi-stage: the build stage compiles the
# release binary; the final image is distroless (glibc, CA certificates, no shell) and runs as
# a non-root user; the injector runs it as 1337 (docs/mtls.md).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p cortexflow-proxy --bin cortexflow-proxy \
 && install -D target/release/cortexflow-proxy /out/cortexflow-proxy

FROM ${BASE_IMAGE}
COPY --from=build /out/cortexflow-proxy /usr/local/bin/cortexflow-proxy
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/cortexflow-proxy"]
