# syntax=docker/dockerfile:1
# A first version: build the virtualenv from the lock file, run the worker as a non-root user.

FROM python:3.11-slim AS build
ENV UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir "uv==0.13.9"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY cgb_worker ./cgb_worker
RUN uv sync --frozen --no-dev

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 worker
WORKDIR /app
COPY --from=build /app /app
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1
USER worker
CMD ["arq", "cgb_worker.WorkerSettings"]
