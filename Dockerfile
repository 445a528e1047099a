# The srtrain image for KubeRay: Ray's GPU image for Python 3.11 plus the project and its `gpu`
# extra, installed against constraints.txt so the image resolves the same versions as CI.
#
#   docker build -t <registry>/srtrain:0.1.0-$(git rev-parse --short=12 HEAD) .   # k8s/overlays/gpu
#   docker build --build-arg RAY_FLAVOR=cpu --build-arg EXTRAS= -t srtrain:0.1.0-cpu .   # cpu-dev
#
# The tag is [project].version from pyproject.toml plus, for a shared registry, the commit: one
# tag per build, never reused (k8s/README.md, step 1). tests/test_k8s.py checks SRTRAIN_VERSION,
# the Ray version and every image tag in k8s/ against pyproject.toml and constraints.txt.
# No credentials are baked in: pods get S3 credentials from a Secret or IRSA / workload identity.

ARG RAY_VERSION=2.60.0
# gpu: CUDA base image for the cluster; cpu: a smaller image for kind / minikube.
ARG RAY_FLAVOR=gpu
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_FLAVOR}

# An ARG before FROM is only visible to FROM; declare it again to use it in the build.
ARG RAY_VERSION
ARG SRTRAIN_VERSION=0.1.0
# pyproject extras to install: "gpu" adds tensorflow[and-cuda]; empty for the CPU image.
ARG EXTRAS=gpu

LABEL org.opencontainers.image.title="srtrain" \
      org.opencontainers.image.description="U-Net image super-resolution training on Ray and TensorFlow" \
      org.opencontainers.image.version="${SRTRAIN_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image's `ray` user (uid 1000, group users 100) owns its Python environment. A numeric
# USER lets Kubernetes verify runAsNonRoot.
USER 1000:100
WORKDIR /home/ray/srtrain

# A regular (not editable) install into the base image's Python; the import check fails the build
# if constraints.txt and the base image disagree on the Ray version.
COPY --chown=1000:100 pyproject.toml README.md constraints.txt ./
COPY --chown=1000:100 srtrain ./srtrain
COPY --chown=1000:100 tune ./tune
RUN python -m pip install --no-cache-dir -c constraints.txt ".${EXTRAS:+[${EXTRAS}]}" \
    && python -c "import srtrain, tune, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Job files live in the image, next to the code that validates them: RayJob entrypoints refer to
# /home/ray/srtrain/jobs/*.yaml, so a run is reproducible from the image tag alone.
COPY --chown=1000:100 jobs ./jobs

ENV PYTHONUNBUFFERED=1
# oneDNN's CPU kernels on every CPU, AVX2-only ones included: a Ray worker may load TensorFlow
# before it imports srtrain, which sets the same default (srtrain/__init__.py).
ENV TF_ENABLE_ONEDNN_OPTS=1
