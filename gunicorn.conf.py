"""Production-like serving: `gunicorn -c gunicorn.conf.py config.wsgi`. Tuned with bench/run on 2 cores; see
docs/benchmarks.md. Every knob can be set from the environment."""

import multiprocessing
import os

# Never serve with DEBUG on: it keeps every SQL query of a request in memory and shows tracebacks to clients.
os.environ["DJANGO_DEBUG"] = "false"

wsgi_app = "config.wsgi:application"
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")

# Requests spend much of their time waiting on PostgreSQL, so a few more workers than cores keep the CPUs busy;
# threads add keep-alive and overlap within a worker without more memory per worker.
workers = int(
    os.environ.get("GUNICORN_WORKERS") or os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() * 2
)
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread" if threads > 1 else "sync"
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 20
# Recycle workers now and then so a slow leak cannot grow without bound; jitter keeps them from restarting together.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "100000"))
max_requests_jitter = max_requests // 10
# Load the application once in the master and fork: faster start, shared memory pages. Django opens no database
# connection at import, so no connection is shared between workers.
preload_app = True

accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None  # off by default: one line per request costs throughput
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
