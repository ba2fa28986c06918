# syntax=docker/dockerfile:1
# The agent image: `cargo xtask images` builds it from the workspace root
# (`docker build -f images/agent.Dockerfile .`). The build stage needs what `cargo xtask setup`
# installs for the kernel programs: the pinned nightly of agent-ebpf/rust-toolchain.toml with
# rust-src, and bpf-linker built against LLVM 22. The eBPF object is compiled by agent/build.rs
# and embedded in the agent binary, so the image carries it with no separate file.
# The final image is distroless; the agent runs as uid 0 with only the capabilities the chart
# grants (BPF, NET_ADMIN, PERFMON), never privileged. It also carries the CNI hook plugin
# (/opt/cortexflow/bin/cortexflow-cni) for an installer to copy to the node's CNI bin directory.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12

FROM ${RUST_IMAGE} AS build
ARG BPF_LINKER_VERSION=0.13.0
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget gnupg \
 && wget -qO- https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
      > /etc/apt/sources.list.d/llvm.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libclang-22-dev libpolly-22-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY agent-ebpf/rust-toolchain.toml agent-ebpf/rust-toolchain.toml
RUN channel="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' agent-ebpf/rust-toolchain.toml)" \
 && rustup toolchain install "$channel" --profile minimal --component rust-src \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features llvm-22
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p cortexflow-agent --bin cortexflow-agent --bin cortexflow-cni \
 && install -D target/release/cortexflow-agent /out/cortexflow-agent \
 && install -D target/release/cortexflow-cni /out/cortexflow-cni

FROM ${BASE_IMAGE}
COPY --from=build /out/cortexflow-agent /usr/local/bin/cortexflow-agent
COPY --from=build /out/cortexflow-cni /opt/cortexflow/bin/cortexflow-cni
USER 0:0
ENTRYPOINT ["/usr/local/bin/cortexflow-agent"]
