# CUDA build of fewstep: build with the CUDA toolkit, run on the slimmer runtime image.
#   docker build --build-arg CUDA_COMPUTE_CAP=90 -t fewstep .
#   docker run --gpus all -p 8080:8080 fewstep
ARG CUDA_VERSION=12.4.1

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    PATH=/root/.cargo/bin:${PATH}
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/* \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY assets ./assets
COPY migrations ./migrations
RUN cargo build --release --features cuda --locked

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
RUN useradd --system --home /srv fewstep
WORKDIR /srv
COPY --from=build /src/target/release/fewstep /usr/local/bin/fewstep
COPY models ./models
# The generation log (SQLite by default; set FEWSTEP_STORE_URL=postgres://... to share one).
RUN mkdir -p /srv/data && chown fewstep /srv/data
VOLUME /srv/data
USER fewstep
ENV FEWSTEP_ADDR=0.0.0.0:8080 FEWSTEP_DEVICE=cuda RUST_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080"]
ENTRYPOINT ["fewstep", "serve"]
