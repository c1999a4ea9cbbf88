"""The Redis feature store: velocity state shared by every riskd replica.

One ``record_and_read`` is one round trip: a single Lua script (sent by
EVALSHA; redis-py loads it again after a Redis restart) that checks the
order id, records the order under every key it carries and reads every query,
atomically. Key layout under ``prefix`` (values are blind indexes, never
plaintext)::

    {prefix}o:{order_id}          STRING  when (clock ms) the order was recorded, TTL 25h
    {prefix}e:{key}:{value}       ZSET    "{amount}:{order_id}" scored by time (ms)
    {prefix}s:{key}:{value}       HASH    per window w: cursor c{w} and running sum s{w}
    {prefix}d:{key}:{of}:{value}  ZSET    of-value scored by its latest sighting (ms)

COUNT and DISTINCT are ``ZCOUNT`` over ``(t - W, t]``: exact. SUM reads a
running sum ``s{w}`` (the total of the events scored after cursor ``c{w}``),
catches its cursor up to ``t - W`` by subtracting the few events in between,
and leaves out events scored after ``t``; so it is exact too, except for an
observation read more than 24 hours behind the newest one of its key (those
events are already trimmed). Each record trims the events that left the
longest window (taking them out of every running sum), adds the new one and
refreshes a 25-hour TTL on every key it touches, so nothing grows without
bound. A record costs about seven Redis calls per key inside the script.

The script builds its key names from the prefix (it takes its fields as one
argument, which is far cheaper for the Python client to send than a list of
keys), so it runs against one Redis (or one shard), not a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from riskd.domain.clock import Clock
from riskd.domain.features import WINDOWS, Agg, FeatureQuery
from riskd.errors import UnavailableError
from riskd.features.store import SEEN_TTL_S, Observation, to_ms

__all__ = ["RedisFeatureStore"]

_WINDOW_INDEX = {name: i + 1 for i, name in enumerate(sorted(WINDOWS, key=WINDOWS.__getitem__))}
_LUA_WINDOWS = ", ".join(str(s * 1000) for s in sorted(WINDOWS.values()))
assert len(WINDOWS) == 3, "the script keeps cursors and sums c1..c3, s1..s3"
_AGG_CODE = {Agg.COUNT: "c", Agg.SUM: "s", Agg.DISTINCT: "d"}

# ARGV: [1] prefix, [2] order_id, [3] the rest as newline-terminated fields (one argument
# is far cheaper to send from Python than dozens): record?, t, amount, now, ttl, #series,
# #distinct, a "name:value" per series, a "key:of:value" per distinct set, "=" and the
# of-value per distinct set ("=" alone when the order lacks it), "code:index:window" per query.
# Keys are built here from the prefix: this script is for one Redis, not a Redis Cluster.
_SCRIPT = r"""
local WINDOWS = {@WINDOWS@}
local P = ARGV[1]
local f = {}
for field in string.gmatch(ARGV[3], '([^\n]*)\n') do f[#f + 1] = field end
local t, amount, now, ttl = tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
local ns, nd = tonumber(f[6]), tonumber(f[7])
local last = #WINDOWS

local function range_sum(ekey, lo, hi)  -- events scored in (lo, hi]
  local total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ekey, '(' .. lo, hi)) do
    total = total + tonumber(string.match(m, '^(%d+):'))
  end
  return total
end

local function record_series(ekey, skey)
  local h = redis.call('HMGET', skey, 'c1', 'c2', 'c3', 's1', 's2', 's3')
  local c, s = {}, {}
  for w = 1, last do c[w], s[w] = tonumber(h[w]) or -1, tonumber(h[w + last]) or 0 end
  local edge = t - WINDOWS[last]
  if c[last] < edge then  -- events leaving the longest window leave every running sum
    local gone = redis.call('ZRANGEBYSCORE', ekey, '(' .. c[last], edge, 'WITHSCORES')
    for k = 1, #gone, 2 do
      local score, amt = tonumber(gone[k + 1]), tonumber(string.match(gone[k], '^(%d+):'))
      for w = 1, last do if score > c[w] then s[w] = s[w] - amt end end
    end
    for w = 1, last do c[w] = math.max(c[w], edge) end
  end
  local update = {}
  for w = 1, last do
    if t > c[w] then s[w] = s[w] + amount end
    update[#update + 1] = 'c' .. w
    update[#update + 1] = c[w]
    update[#update + 1] = 's' .. w
    update[#update + 1] = s[w]
  end
  if t > c[last] then redis.call('ZADD', ekey, t, f[3] .. ':' .. ARGV[2]) end
  redis.call('ZREMRANGEBYSCORE', ekey, '-inf', c[last])
  redis.call('HSET', skey, unpack(update))
  redis.call('EXPIRE', ekey, ttl)
  redis.call('EXPIRE', skey, ttl)
end

local function record_distinct(dkey, value)
  if value == '' then return end
  redis.call('ZADD', dkey, 'GT', t, value)
  redis.call('ZREMRANGEBYSCORE', dkey, '-inf', t - WINDOWS[last])
  redis.call('EXPIRE', dkey, ttl)
end

local function read_sum(ekey, skey, w)
  local h = redis.call('HMGET', skey, 'c' .. w, 's' .. w)
  local c, s = tonumber(h[1]) or -1, tonumber(h[2]) or 0
  local edge = t - WINDOWS[w]
  if c < edge then
    s = s - range_sum(ekey, c, edge)
    if h[1] then redis.call('HSET', skey, 'c' .. w, edge, 's' .. w, s) end  -- catch up once
  elseif c > edge then
    s = s + range_sum(ekey, edge, c)
  end
  return s - range_sum(ekey, t, '+inf')
end

local function first_time()  -- the marker holds when (clock ms) the order was recorded
  local marker = P .. 'o:' .. ARGV[2]
  local seen = tonumber(redis.call('GET', marker))
  if seen and seen > now - ttl * 1000 then return false end
  redis.call('SET', marker, now, 'EX', ttl)
  return true
end

local function series(i, kind) return P .. kind .. f[7 + i] end
local function distinct(j) return P .. 'd:' .. f[7 + ns + j] end

if f[1] == '1' and first_time() then
  for i = 1, ns do record_series(series(i, 'e:'), series(i, 's:')) end
  for j = 1, nd do record_distinct(distinct(j), string.sub(f[7 + ns + nd + j], 2)) end
end

local out = {}
for q = 8 + ns + 2 * nd, #f do
  local code, i, w = string.match(f[q], '^(%a):(%d+):(%d+)$')
  i, w = tonumber(i), tonumber(w)
  local lo = '(' .. (t - WINDOWS[w])
  if code == 'c' then out[#out + 1] = redis.call('ZCOUNT', series(i, 'e:'), lo, t)
  elseif code == 'd' then out[#out + 1] = redis.call('ZCOUNT', distinct(i), lo, t)
  else out[#out + 1] = read_sum(series(i, 'e:'), series(i, 's:'), w) end
end
return table.concat(out, ' ')  -- one bulk reply parses faster than an array
""".replace("@WINDOWS@", _LUA_WINDOWS)


class RedisFeatureStore:
    """A ``FeatureStore`` in Redis; see the module docstring.

    Args:
        url: ``redis://host:port/db``.
        clock: times the idempotency markers (an order id is remembered for
            ``SEEN_TTL_S`` clock seconds); windows end at ``Observation.at``.
            Key TTLs, which only reclaim memory, run on Redis's own clock.
        prefix: every key starts with it (one per deployment, one per test).
        timeout_s: socket connect and read timeout; a dead or stalled Redis
            raises ``UnavailableError`` after about this long. No retries: the
            caller falls back, and the next call reconnects.
    """

    def __init__(
        self, url: str, clock: Clock, *, prefix: str = "riskd:f:", timeout_s: float = 0.05
    ) -> None:
        self._clock = clock
        self._prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._script = self._client.register_script(_SCRIPT)
        self._plans: tuple[object, dict[tuple[str, ...], _Plan]] = (None, {})

    @property
    def prefix(self) -> str:
        return self._prefix

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        return self._call(obs, queries, record=True)

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        return self._call(obs, queries, record=False)

    def close(self) -> None:
        self._client.close()

    def _call(
        self, obs: Observation, queries: Collection[FeatureQuery], *, record: bool
    ) -> dict[FeatureQuery, int]:
        plan = self._plan_for(queries, tuple(obs.keys))
        body = self._body(obs, plan, record=record)
        try:
            reply = cast(bytes, self._script(args=(self._prefix, obs.order_id, body)))
        except redis.RedisError as exc:
            raise UnavailableError(f"feature store: redis {type(exc).__name__}") from exc
        result = dict.fromkeys(queries, 0)
        result.update(zip(plan.asked, map(int, reply.split()), strict=True))
        return result

    def _body(self, obs: Observation, plan: _Plan, *, record: bool) -> str:
        """The script's newline-terminated fields (see ``_SCRIPT``)."""
        keys = obs.keys
        now = to_ms(self._clock.now())
        fields = [str(int(record)), str(obs.at_ms), str(obs.amount), str(now), plan.head]
        fields += (f"{name}:{value}" for name, value in keys.items())
        fields += (f"{k}:{of}:{keys[k]}" for k, of in plan.pairs)
        fields += ("=" + keys.get(of, "") for _, of in plan.pairs)
        fields.append(plan.tail)
        return "\n".join(fields)

    def _plan_for(self, queries: Collection[FeatureQuery], names: tuple[str, ...]) -> _Plan:
        """The plan for these queries and key names; cached for immutable collections."""
        if not isinstance(queries, frozenset | tuple):
            return _Plan.make(queries, names)
        cached_for, plans = self._plans  # one read: another thread may swap in a new pair
        if cached_for is not queries:
            plans = {}
            self._plans = (queries, plans)
        plan = plans.get(names)
        if plan is None:
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plan = plans[names] = _Plan.make(queries, names)
        return plan


_MAX_PLANS = 1024  # key-name combinations cached per query set


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a query set asks of an order carrying these key names, in script order."""

    pairs: tuple[tuple[str, str], ...]  # distinct sets to read (and record)
    asked: tuple[FeatureQuery, ...]  # the queries the script answers, in its order
    head: str  # the "ttl, #series, #distinct" fields
    tail: str  # the query fields, newline-terminated

    @staticmethod
    def make(queries: Collection[FeatureQuery], names: tuple[str, ...]) -> _Plan:
        present = set(names)
        pairs = sorted(
            {(q.key, q.of) for q in queries if q.agg is Agg.DISTINCT and q.key in present}
        )
        series = {name: i + 1 for i, name in enumerate(names)}
        distinct = {pair: j + 1 for j, pair in enumerate(pairs)}
        asked = tuple(q for q in set(queries) if q.key in present)
        codes = [
            f"{_AGG_CODE[q.agg]}:"
            f"{distinct[(q.key, q.of)] if q.agg is Agg.DISTINCT else series[q.key]}:"
            f"{_WINDOW_INDEX[q.window]}"
            for q in asked
        ]
        head = f"{SEEN_TTL_S}\n{len(names)}\n{len(pairs)}"
        return _Plan(tuple(pairs), asked, head, "".join(c + "\n" for c in codes))
