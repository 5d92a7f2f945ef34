# One image for both services; the Helm chart (helm/chat-bridge) chooses the command:
#   python -m bridge --host 0.0.0.0 --port 8080          (chat-bridge)
#   python -m backend_stream --host 0.0.0.0 --port 8100  (chat-backend)
# Python packages come only from the committed uv.lock (`uv sync --locked`), like dev.sh; uv itself
# is pinned with hashes by .ci/uv.txt. tests/helm/test_dockerfile.py checks this file's shape.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_PROGRESS=1
WORKDIR /app
COPY .ci/uv.txt /tmp/uv.txt
RUN python -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes \
        --no-deps -r /tmp/uv.txt
# The locked dependencies first (a layer that survives source changes), then the project.
COPY pyproject.toml uv.lock ./
RUN /opt/uv/bin/uv sync --locked --no-dev --no-install-project --python "$(command -v python)"
COPY contracts ./contracts
COPY backend_stream ./backend_stream
COPY bridge ./bridge
COPY loadtest ./loadtest
# --no-editable: the packages land in the venv's site-packages, so the venv is all the runtime
# needs (no path back into /app).
RUN /opt/uv/bin/uv sync --locked --no-dev --no-editable --python "$(command -v python)"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
# The venv holds the dependencies and the project's own packages (installed, not editable).
COPY --from=builder /app/.venv /app/.venv
# The chart mounts the root filesystem read-only: nothing may need to write next to the code.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
EXPOSE 8080 8100
CMD ["python", "-m", "bridge", "--host", "0.0.0.0", "--port", "8080"]
