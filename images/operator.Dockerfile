# syntax=docker/dockerfile:1
# The operator image: `cargo xtask images` builds it from the workspace root
# (`docker build -f images/operator.Dockerfile .`). Multi-stage: the build stage compiles the
# release binary; the final image is distroless (glibc, CA certificates, no shell) and runs as
# the non-root user 65532, as the chart's securityContext requires.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p cortexflow-operator --bin cortexflow-operator \
 && install -D target/release/cortexflow-operator /out/cortexflow-operator

FROM ${BASE_IMAGE}
COPY --from=build /out/cortexflow-operator /usr/local/bin/cortexflow-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cortexflow-operator"]
