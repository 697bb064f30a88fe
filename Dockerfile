# One image with the operator, Stowaway, the bridge router (gefyra-carrier) and the CLI: the
# static binaries `make static` builds (musl, rustls, no OpenSSL; checked to be statically
# linked and to run) on an empty base, run as a non-root user. It builds offline — no base
# image to pull:
#   make image                                  (a private dockerd; saves a tarball)
#   make static && docker build -t gefyra-operator .
# The chart runs `gefyra-operator` and `stowaway` from it, the operator runs `gefyra-carrier`
# from it for each bridge mount; `kubectl-gefyra` is there too.

FROM scratch
LABEL org.opencontainers.image.title="gefyra-operator" \
      org.opencontainers.image.description="Gefyra's cluster side: the GefyraClient operator, Stowaway, the bridge router and kubectl-gefyra" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY target/x86_64-unknown-linux-musl/release/gefyra-operator \
     target/x86_64-unknown-linux-musl/release/stowaway \
     target/x86_64-unknown-linux-musl/release/gefyra-carrier \
     target/x86_64-unknown-linux-musl/release/kubectl-gefyra \
     /usr/local/bin/
ENV PATH=/usr/local/bin
# The chart's runAsUser; no shell, no package manager, nothing else in the image.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/gefyra-operator"]
