"""AckWindow: PUBACKs leave in arrival order whatever order the consumer acks in."""

from __future__ import annotations

import random

from devices.link.mqtt import AckWindow


def test_in_order_acks_go_out_at_once() -> None:
    window = AckWindow()
    window.arrive([1, 2, 3])
    assert window.ack([1, 2]) == [1, 2]
    assert window.ack([3]) == [3]
    assert window.held == 0


def test_a_later_ack_waits_for_the_earlier_ones() -> None:
    window = AckWindow()
    window.arrive([1, 2, 3, 4])
    assert window.ack([3, 2]) == []
    assert window.held == 2
    assert window.ack([1]) == [1, 2, 3]
    assert window.ack([4]) == [4]


def test_skipped_messages_are_acked_in_their_place() -> None:
    window = AckWindow()
    window.arrive([1])
    window.arrive_acked(2)
    window.arrive([3])
    assert window.release() == []
    assert window.ack([3]) == []
    assert window.ack([1]) == [1, 2, 3]


def test_unknown_and_repeated_acks_are_ignored() -> None:
    window = AckWindow()
    window.arrive([5, 6])
    assert window.ack([9, 0]) == []
    assert window.ack([5]) == [5]
    assert window.ack([5]) == []
    assert window.ack([6, 6]) == [6]
    assert window.held == 0


def test_an_id_reused_while_unacked_needs_one_ack_per_copy() -> None:
    """A 3.1.1 broker without a receive maximum may reuse an unacked id."""
    window = AckWindow()
    window.arrive([7, 8])
    window.arrive([7])
    assert window.ack([8]) == []
    assert window.ack([7]) == [7, 8]
    assert window.ack([7]) == [7]
    window.arrive([4, 4])  # reused within one read
    assert window.ack([4]) == [4]
    assert window.ack([4]) == [4]
    assert window.held == 0


def test_random_ack_orders_always_release_in_arrival_order() -> None:
    rng = random.Random(3)
    for _ in range(300):
        window = AckWindow()
        ids = rng.sample(range(1, 200), rng.randint(1, 40))
        cut = rng.randint(0, len(ids))
        window.arrive(ids[:cut])
        skipped = set(rng.sample(ids[cut:], min(3, len(ids) - cut)))
        for pid in ids[cut:]:
            if pid in skipped:
                window.arrive_acked(pid)
            else:
                window.arrive([pid])
        to_ack = [pid for pid in ids if pid not in skipped]
        rng.shuffle(to_ack)
        sent: list[int] = window.release()
        while to_ack:
            k = rng.randint(1, 5)
            chunk, to_ack = to_ack[:k], to_ack[k:]
            sent += window.ack(chunk)
        assert sent == ids
        assert window.held == 0
