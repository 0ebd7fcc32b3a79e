"""Work run on many threads at once, each with its own database connection: for the tests that hammer one member,
one budget or one purchase from many clients on real PostgreSQL."""

import threading
import time

from django.db import connection


def at_once(count, work, *, timeout: float = 120) -> list:
    """Run work(i) for i in range(count), each on its own thread, all released together; each one's result, or the
    exception it raised."""
    barrier = threading.Barrier(count)
    outcomes: list = [None] * count

    def run(i):
        try:
            barrier.wait(timeout=30)
            outcomes[i] = work(i)
        except Exception as exc:  # reported to the test, which asserts on it
            outcomes[i] = exc
        finally:
            connection.close()  # each thread has its own connection; leave none open behind the test

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    return outcomes


def failures(outcomes: list) -> list[Exception]:
    return [outcome for outcome in outcomes if isinstance(outcome, Exception)]


def someone_waits_on_a_lock() -> bool:
    """Whether a connection to this database waits on a lock now. The statistics snapshot is cleared first, so it
    also answers anew inside a transaction."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_stat_clear_snapshot(), count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[1] > 0


def until_someone_waits_on_a_lock(timeout: float = 10) -> bool:
    """Wait until a connection to this database waits on a lock, at most `timeout` seconds; whether one does."""
    deadline = time.monotonic() + timeout
    while not someone_waits_on_a_lock():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
