"""StepPlan pickles its cached requests as columns (messages.StepPlan.__reduce__): the round trip
must give back an equal plan whatever the fields hold."""

from __future__ import annotations

import pickle

from distrt.messages import CachedRequest, NewRequest, PlacementUpdate, SamplingSpec, StepPlan


def test_plan_round_trip_keeps_every_field() -> None:
    cached = tuple(CachedRequest(f"r{i}", 10 + i, (i,) if i % 3 == 0 else (), (7, i) if i % 2 else (), i % 4 == 1)
                   for i in range(9))
    new = (NewRequest("n0", (1, 2, 3), 3, (4,), 0, SamplingSpec(seed=1)),)
    plan = StepPlan(5, new, cached, {"n0": 3, **{c.req_id: 1 for c in cached}}, ("gone",),
                    (PlacementUpdate(2, 1, (1, 0)),), True)
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(plan, protocol=proto))
        assert back == plan
        assert [type(c.deferred) for c in back.cached_requests] == [bool] * 9
        assert list(back.num_scheduled_tokens) == list(plan.num_scheduled_tokens)  # batch order kept


def test_empty_plan_round_trip() -> None:
    assert pickle.loads(pickle.dumps(StepPlan(1))) == StepPlan(1)


def test_columns_pickle_smaller_than_objects() -> None:
    cached = tuple(CachedRequest(f"request-{i}", 100 + i, (), (), True) for i in range(256))
    plan = StepPlan(3, (), cached, {c.req_id: 1 for c in cached})
    per_object = len(pickle.dumps(cached))  # each CachedRequest named and framed on its own
    assert len(pickle.dumps(plan)) < per_object
