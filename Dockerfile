# The dlray image for KubeRay (k8s/*.yaml) and `dlray k8s render --image`.
#
#   docker build -t registry.example.com/dlray:0.1.0 . && docker push registry.example.com/dlray:0.1.0
#
# Ray's own image keeps the head, workers and the job submitter on exactly the Ray (2.60.0) and
# Python (3.11) that pyproject.toml pins; the GPU variant also runs CPU-only pods.
FROM rayproject/ray:2.60.0-py311-gpu

# Numeric, so Kubernetes can verify runAsNonRoot; 1000:100 is the base image's `ray` user, which
# also owns the image's Python environment that pip installs into.
USER 1000:100

# Manifests name job files by this path (dlray.k8s.APP_DIR): a changed job file needs a new image.
RUN mkdir -p /home/ray/dlray
WORKDIR /home/ray/dlray

# Only what the package and its jobs need: never .venv, runs/ or out/ from the build context.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 dlray ./dlray
COPY --chown=1000:100 jobs ./jobs
RUN pip install --no-cache-dir -e .
