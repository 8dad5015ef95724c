# One image for every role: api, dispatcher, migrate, simulator (`python -m service <role>`).
# The base is pinned by digest (the multi-platform index of python:3.11-slim-bookworm). To move it:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # the "Digest:" line
# and put that digest after the @ below.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The dependencies from the hashed lock (`make lock`), pip and setuptools included, in their own
# layer; then the service itself, built with the locked setuptools and nothing else fetched.
COPY requirements.lock ./
RUN pip install --no-compile --require-hashes --requirement requirements.lock

COPY pyproject.toml README.md ./
COPY service ./service
COPY alembic ./alembic
COPY alembic.ini ./
RUN pip install --no-compile --no-deps --no-build-isolation . \
    && pip check \
    && rm -rf build *.egg-info \
    && useradd --system --uid 10001 tracking

USER tracking
EXPOSE 8080
ENTRYPOINT ["python", "-m", "service"]
CMD ["api"]
