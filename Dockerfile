# The Twilio <-> Deepgram Voice Agent bridge.
#   docker build -t pharmacy-bridge . && docker run --env-file .env -p 5000:5000 pharmacy-bridge
FROM python:3.11-slim

# HOST: the bridge's own default is 127.0.0.1 (this machine only); in a container it must listen
# on every interface for the published port to reach it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0

WORKDIR /app

# Dependencies first, so editing the code doesn't reinstall them. uvloop is optional: the server
# uses it when it is installed (less CPU per message). psycopg is too: the store uses PostgreSQL
# when DATABASE_URL is set (several replicas sharing one set of orders), the SQLite file otherwise.
COPY requirements.txt requirements-postgres.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-postgres.txt "uvloop==0.23.0"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

# The application. Add your own modules here if pharmacy_functions.py imports any.
COPY main.py config.json pharmacy_functions.py ./
COPY agents/ ./agents/
COPY bridge/ ./bridge/

# The only places the bridge writes: the pharmacy's SQLite file (PHARMACY_DB, default
# data/pharmacy.db; unused when DATABASE_URL is set) and the call records (CALLS_DIR, default
# calls/). Mount volumes here to keep them.
RUN mkdir -p /app/data /app/calls && chown app:app /app/data /app/calls && chmod 0700 /app/data /app/calls

USER 10001:10001

EXPOSE 5000

# /health answers 200 while serving and 503 while draining; slim images have no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('PORT') or '5000'), timeout=4)"]

# SIGTERM starts a graceful drain (DRAIN_TIMEOUT_SECONDS); give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
CMD ["python", "main.py"]
