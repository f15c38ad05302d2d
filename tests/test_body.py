"""Request bodies: kept in memory while small, spooled to one file past that, and sent upstream in pieces with
the upstream connection's backpressure."""

from twisted.internet import task

from fwd.body import (
    READ_SIZE,
    BytesProducer,
    FileProducer,
    MemoryBudget,
    RequestBody,
    body_producer,
)


class Slices:
    """A Cooperator that runs one unit of work per slice, when the test says."""

    def __init__(self):
        self.waiting = []
        self.cooperator = task.Cooperator(terminationPredicateFactory=lambda: (lambda: True),
                                          scheduler=self.waiting.append)

    def run(self, count: int = 1) -> None:
        for _ in range(count):
            if self.waiting:
                self.waiting.pop(0)()


class Consumer:
    """What a transport does with a producer: takes its writes, and pauses it past `pause_after` bytes."""

    def __init__(self, producer=None, pause_after=None):
        self.producer = producer
        self.pause_after = pause_after
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data
        if self.pause_after is not None and len(self.data) >= self.pause_after:
            self.pause_after = None
            self.producer.pauseProducing()


def test_a_small_body_stays_in_memory_and_a_large_one_takes_one_file():
    budget = MemoryBudget(limit=1000)
    small, large = RequestBody(spool_at=100, budget=budget), RequestBody(spool_at=100, budget=budget)
    small.write(b"x" * 60)
    large.write(b"y" * 60)
    large.write(b"y" * 60)
    assert not small.spooled and large.spooled
    assert budget.used == 60, "only what stays in memory counts against the process's budget"
    assert large.getvalue() == b"y" * 120 and large.head(5) == b"yyyyy"
    small.close(), large.close()
    assert budget.used == 0


def test_bodies_spool_once_the_process_holds_its_memory_budget():
    budget = MemoryBudget(limit=100)
    first, second = RequestBody(spool_at=1000, budget=budget), RequestBody(spool_at=1000, budget=budget)
    first.write(b"a" * 90)
    second.write(b"b" * 20)
    assert not first.spooled and second.spooled, "a thousand small uploads cannot hold the process's memory"
    second.seek(0)
    assert second.read() == b"b" * 20


def test_a_spooled_body_is_sent_in_pieces_one_per_slice_and_again_from_its_start_for_a_replay():
    slices = Slices()
    body = RequestBody(spool_at=10)
    content = bytes(range(256)) * (3 * READ_SIZE // 256 + 7)
    body.write(content)
    producer = body_producer(body, slices.cooperator)
    assert isinstance(producer, FileProducer) and producer.length == len(content)
    for attempt in range(2):
        consumer = Consumer()
        done = producer.startProducing(consumer)
        slices.run()
        assert len(consumer.data) == READ_SIZE, "one piece per slice: other clients are served between"
        slices.run(10)
        assert consumer.data == content and done.called, attempt


def test_the_upstream_connections_backpressure_pauses_the_body_until_it_drains():
    slices = Slices()
    body = RequestBody(spool_at=10)
    body.write(b"z" * (4 * READ_SIZE))
    producer = body_producer(body, slices.cooperator)
    consumer = Consumer(producer, pause_after=READ_SIZE)
    producer.startProducing(consumer)
    slices.run(5)
    assert len(consumer.data) == READ_SIZE, "paused: nothing more is read from the file"
    producer.resumeProducing()
    slices.run(5)
    assert len(consumer.data) == 4 * READ_SIZE


def test_a_resume_without_a_pause_and_a_pause_before_the_start_are_taken_in_stride():
    # A pooled upstream connection whose last body was cut short while paused asks the next body's producer
    # to resume although it never paused it: that must not fail the request (it answered 502 before).
    slices = Slices()
    body = RequestBody(spool_at=10)
    body.write(b"q" * (2 * READ_SIZE))
    producer = body_producer(body, slices.cooperator)
    producer.resumeProducing()
    consumer = Consumer()
    done = producer.startProducing(consumer)
    producer.resumeProducing()
    slices.run(4)
    assert consumer.data == b"q" * (2 * READ_SIZE) and done.called
    producer.resumeProducing()  # after the end, too
    producer.pauseProducing()
    producer.resumeProducing()
    early = body_producer(body, slices.cooperator)
    early.pauseProducing()
    second = Consumer()
    early.startProducing(second)
    slices.run(2)
    assert second.data == b"", "a pause asked before the start holds"
    early.resumeProducing()
    slices.run(4)
    assert len(second.data) == 2 * READ_SIZE


def test_a_body_in_memory_is_written_at_once():
    body = RequestBody()
    body.write(b"{}")
    producer = body_producer(body, Slices().cooperator)
    consumer = Consumer()
    assert isinstance(producer, BytesProducer) and producer.startProducing(consumer).called
    assert consumer.data == b"{}"
