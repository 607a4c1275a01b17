# syntax=docker/dockerfile:1
# cgb-worker: build the virtualenv from uv.lock in one stage, run it as a non-root user in a slim one.

FROM python:3.11-slim-bookworm AS build
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "uv==0.13.9"
WORKDIR /app
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY cgb_worker ./cgb_worker
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim-bookworm
RUN groupadd --gid 10001 worker \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin worker
COPY --from=build --chown=root:root /app/.venv /app/.venv
ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
# This container's own worker (PID 1 in its PID namespace), not any worker on the Redis as `arq --check`
# would: its heartbeat is refreshed every WORKER_HEALTH_CHECK_INTERVAL (10 s); it is unhealthy once it missed
# two refreshes or has not polled the queue for WORKER_JOB_TIMEOUT + 10 s (see cgb_worker/heartbeat.py).
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=2 \
    CMD ["cgb-worker", "health"]
# SIGTERM lets running jobs finish for WORKER_JOB_COMPLETION_WAIT (20 s): give the container longer to stop.
STOPSIGNAL SIGTERM
# The webhook receiver runs from the same image: `cgb-worker webhooks` (port 8090; see docker-compose.yml).
EXPOSE 8090
# arq's own command and its own Worker; it rides out a Redis restart, and the restart policy covers an
# outage longer than the two minutes its commands retry.
CMD ["arq", "cgb_worker.WorkerSettings"]
