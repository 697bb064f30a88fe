# syntax=docker/dockerfile:1
# One image with the operator, Stowaway and the CLI: static binaries (musl, rustls, no
# OpenSSL) on an empty base, run as a non-root user.
#   docker build -t gefyra-operator .
# The chart runs `gefyra-operator` and `stowaway` from it; `kubectl-gefyra` is there too.

FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools file \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# `make static` is what `make test` runs too: a --locked release build for musl, checked
# to be statically linked and to run.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    make static \
 && mkdir -p /out \
 && for binary in gefyra-operator stowaway kubectl-gefyra; do \
      cp "target/x86_64-unknown-linux-musl/release/$binary" /out/; \
    done

FROM scratch
LABEL org.opencontainers.image.title="gefyra-operator" \
      org.opencontainers.image.description="Gefyra's cluster side: the GefyraClient operator, Stowaway and kubectl-gefyra" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
ENV PATH=/usr/local/bin
# The chart's runAsUser; no shell, no package manager, nothing else in the image.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/gefyra-operator"]
