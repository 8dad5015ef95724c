# One image for every role: api, dispatcher, migrate, simulator (`python -m service <role>`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY service ./service
COPY alembic ./alembic
COPY alembic.ini ./
RUN pip install --no-compile . && useradd --system --uid 10001 tracking

USER tracking
EXPOSE 8080
ENTRYPOINT ["python", "-m", "service"]
CMD ["api"]
