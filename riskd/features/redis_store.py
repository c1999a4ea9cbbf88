"""The Redis feature store: velocity state shared by every riskd replica.

One ``record_and_read`` is one round trip: a single Lua script (sent by
EVALSHA; loaded again after a Redis restart) that checks the order id, records
the order under every key it carries and reads every query, atomically; the call
is bounded in all by ``timeout_s`` per shard (see ``RedisFeatureStore``). Key layout
under ``prefix`` (values, and the order ids the engine passes, are blind indexes,
never plaintext)::

    {prefix}o:{order_id}          STRING  when (clock ms) each of its keys was recorded and the
                                          content tag it claimed, TTL 25h
    {prefix}ev:{key}:{value}      ZSET    "{amount}:{order_id}" scored by time (ms)
    {prefix}tot:{key}:{value}     STRING  per window w: cursor, count and sum after it
    {prefix}d:{key}:{of}:{value}  ZSET    of-value scored by its latest sighting (ms)

COUNT and SUM of a key read running totals: the count and sum of the events
scored after a per-window cursor. Each call moves a cursor up to ``t - W``,
taking the few events in between out of the totals (one range read, skipped
when none of them can be in between), adds the window's missed events when a
later observation already moved it further, and leaves out events scored after
``t``. DISTINCT is a ``ZCOUNT`` over ``(t - W, t]``. As in the in-process store,
events more than the longest window older than the key's newest recorded event
(sightings: than the set's newest) no longer count, whether or not a tidy-up has
removed them yet; so both backends give the same exact answers, late
observations included. The totals of every key of an order are one ``MGET`` and
one ``SET`` each (with the TTL); a recorded order is one ``ZADD`` and one ``EXPIRE``
per event set and per distinct set, so every set's TTL is as fresh as its state's (a
``volatile-ttl`` policy does not evict the sets first). Removing what no longer counts
happens when a set is created and then every 30 minutes of observation time, so a key
lives 25 hours after its last order and nothing grows without bound; a key whose state
is not there has no sets either (one ``EXISTS`` checks), so its first order trims
nothing and its distinct counts need no ``ZCOUNT``. Where Redis evicted the state alone
(a ``volatile-*`` maxmemory policy may: every key has a TTL), the state is rebuilt from
the key's event set, so counts stay exact; where it evicted an event set and kept the
state, the next order drops the totals of the events gone (they count no more) and
recreates the set with its TTL. An order whose marker was evicted, retried, finds its
event in the set and is counted once. Sums
saturate at ``MAX_SUM`` (2^53 - 1 fen, the largest the script's doubles hold exactly, as
in the in-process store); every number the script writes or returns is formatted as a
plain integer. With the 200-rule load
set (63 queries, 7 keys) Redis spends about 0.6x the CPU per order of the
sorted-set layout it replaced and runs about 59 commands per order
(``benchmarks/load/redis_cost.py``); most of its time is the script's own Lua, so
the queries travel as three bytes each rather than as text to match.

The script builds its key names from the prefix (it takes its fields as one
argument, which is far cheaper for the Python client to send than a list of
keys), so it runs against one Redis, not a Redis Cluster. One Redis runs the
script for fewer than two thousand orders per second (0.5–0.8 ms of its CPU per
order with the 200-rule load set); for more, give several URLs: each
key (name and value) lives on the shard its CRC-32 picks, an order's keys go to
their shards in one script call per shard (all sent, then all read), and each
shard keeps its own marker of the order id with the keys it recorded, so a retry
after a partial failure records the order on the shards that missed it and
nowhere twice (recording is idempotent per order and key: ``riskd.features.store``).
The order's content claim lives on its home shard only (the order id's CRC-32 picks
it), which every recording call reaches (a marker-only call when none of the order's
keys lives there); the other shards do not check it.
The list is part of the layout: reordering it or adding a shard moves keys,
whose windows then start empty on their new shard (the old entries expire).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import ipaddress
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from riskd.domain.clock import Clock
from riskd.domain.features import WINDOWS, Agg, FeatureQuery
from riskd.errors import ConfigError, UnavailableError
from riskd.features.store import (
    MAX_SUM,
    SEEN_TTL_S,
    Observation,
    OtherContentError,
    WritesRefusedError,
    to_ms,
)

__all__ = ["RedisFeatureStore"]

_WINDOW_INDEX = {name: i + 1 for i, name in enumerate(sorted(WINDOWS, key=WINDOWS.__getitem__))}
_LUA_WINDOWS = ", ".join(str(s * 1000) for s in sorted(WINDOWS.values()))
assert len(WINDOWS) == 3, "the script keeps cursors and sums c1..c3, s1..s3"
_TIDY_MS = 30 * 60 * 1000  # see the module docstring: trims and TTL refreshes
_AGG_CODE = {Agg.COUNT: "c", Agg.SUM: "s", Agg.DISTINCT: "d"}
_CLAIMED = b"!"  # the script's reply: the order id was recorded for other content

# ARGV: [1] prefix, [2] order_id, [3] the rest as newline-terminated fields (one argument
# is far cheaper to send from Python than dozens): record?, t, amount, now, ttl, #series,
# #distinct, a "name:value" per series, a "key:of:value" per distinct set, "=" and the
# of-value per distinct set ("=" alone when the order lacks it), one field with each
# series' tag (8 hex digits of the CRC-32 of "name:value"), one field of three bytes per
# query: its code (c, s or d), index and window (each as the byte 48 + n), then the
# order's content tag (empty: not checked). The reply is "!" when the order id was
# recorded for another content tag (nothing recorded), else the queries' values.
# Keys are built here from the prefix: this script is for one Redis, not a Redis Cluster.
_SCRIPT = (
    r"""
local WINDOWS = {@WINDOWS@}
local TIDY = @TIDY@  -- ms of observation time between two tidy-ups of a set (trim, TTL)
local CAP = @CAP@  -- MAX_SUM: sums saturate here, below 2^53 (Lua numbers are doubles)
-- Every number the script writes or returns goes through int: Lua's own conversion
-- (%.14g) writes 1e+14 for 10^14, which neither this script nor Python reads back exactly.
-- Below 10^14 (every count and time) it is exact and far cheaper than string.format.
local function int(x)
  if x < 1e14 and x > -1e14 then return x end
  return string.format('%.0f', x)
end
local P, ID = ARGV[1], ARGV[2]
local f = {}
for field in string.gmatch(ARGV[3], '([^\n]*)\n') do f[#f + 1] = field end
local T, AMOUNT = f[2], f[3]  -- as sent: strings go to redis.call as they are
local t, amount, now, ttl = tonumber(T), tonumber(AMOUNT), tonumber(f[4]), tonumber(f[5])
local ns, nd = tonumber(f[6]), tonumber(f[7])
local L = #WINDOWS
local EDGE = {}  -- per window: t - W
for w = 1, L do EDGE[w] = t - WINDOWS[w] end

local function range(ekey, lo, hi)  -- count and sum (at most CAP) of the events in (lo, hi]
  local n, total = 0, 0
  if type(lo) == 'number' then lo = int(lo) end  -- else as sent (T), or '+inf'
  if type(hi) == 'number' then hi = int(hi) end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ekey, '(' .. lo, hi)) do
    n = n + 1
    total = total + tonumber(string.match(m, '^(%d+):'))
    if total > CAP then total = CAP end
  end
  return n, total
end

-- A series: its events (ZSET "ev:") and its state (STRING "tot:", space-separated):
-- per window w the cursor c, and the count n and sum s of the events scored after it;
-- m, the latest event; x, when the event set was last tidied (observation ms); then
-- "of=x,n" per distinct set of the key: when it was last tidied and its latest recorded
-- sighting. Cursors move up to their window's edge here (the events in between leave
-- the totals). As in the in-process store, events more than the longest window older
-- than m (sightings, than n) no longer count, whether or not a tidy-up has removed them
-- yet. A sum at CAP is saturated: the window sums it feeds are counted from the events.
-- A series whose state is not there is fresh when its sets are not there either (the
-- usual case: their TTLs are set no later than the state's last write, and are as long),
-- so nothing needs trimming and its distinct sets hold only what this call adds. Where
-- they are (Redis evicted the state alone: any volatile-* maxmemory policy may), the
-- state is rebuilt from the event set, so totals and sets agree.
local S, index = {}, {}
local states = {}
for i = 1, ns do
  local name = f[7 + i]
  S[i] = {e = P .. 'ev:' .. name, h = P .. 'tot:' .. name, dx = {}, dn = {}, cache = {}}
  S[i].sets = {S[i].e}  -- its event set and the distinct sets this call reads
  states[i] = S[i].h
  index[string.match(name, '^([^:]*):')] = i
end

local DKEY, DST, DOF, DADD, DLATER = {}, {}, {}, {}, {}  -- per distinct set: key, its key's
-- series, its "of", whether this call added a sighting, and whether the order's of-value
-- was last seen after t (another order's sighting, recorded first though stamped later)
for j = 1, nd do
  DKEY[j] = P .. 'd:' .. f[7 + ns + j]
  local key, of = string.match(f[7 + ns + j], '^([^:]*):([^:]*):')
  DST[j], DOF[j] = S[index[key]], of
  DST[j].sets[#DST[j].sets + 1] = DKEY[j]
end

local packed = ns > 0 and redis.call('MGET', unpack(states)) or {}
for i = 1, ns do
  local st, v, k, state = S[i], {}, 0, packed[i]
  -- a state an older script wrote with Lua's %.14g (1e+14: a sum's low digits lost) is
  -- rebuilt as an evicted one is
  if state and string.find(state, '%de[+-]') then state = false end
  if state then
    st.exists = true
    for word in string.gmatch(state, '%S+') do
      k = k + 1
      if k <= 3 * L + 2 then v[k] = tonumber(word)
      else
        local of, x, newest = string.match(word, '^([^=]*)=(%-?%d+),(%-?%d+)$')
        x, newest = tonumber(x), tonumber(newest)
        if x >= 0 then st.dx[of] = x end
        st.dn[of] = newest >= 0 and newest  -- false: its set held no sighting (below)
      end
    end
  elseif redis.call('EXISTS', unpack(st.sets)) == 0 then
    st.fresh = true
  else  -- its state was evicted: rebuilt from its events (cursors at the edges, and
    -- never below the longest window behind the latest event: those count no more)
    st.exists, st.dirty = true, true
    local top = redis.call('ZRANGE', st.e, -1, -1, 'WITHSCORES')
    local m = top[2] and tonumber(top[2]) or -1
    v[3 * L + 1] = m
    for w = 1, L do
      v[w] = math.max(EDGE[w], m - WINDOWS[L])
      v[L + w], v[2 * L + w] = range(st.e, v[w], '+inf')
    end
  end
  st.c, st.n, st.s = {}, {}, {}
  for w = 1, L do st.c[w], st.n[w], st.s[w] = v[w] or -1, v[L + w] or 0, v[2 * L + w] or 0 end
  st.m, st.x = v[3 * L + 1] or -1, v[3 * L + 2]
  for w = 1, L do
    local edge = EDGE[w]
    if st.c[w] < edge then
      if st.n[w] > 0 then
        if st.m <= edge then st.n[w], st.s[w] = 0, 0
        else
          local n, s = range(st.e, st.c[w], edge)
          st.n[w] = st.n[w] - n
          if st.s[w] < CAP then st.s[w] = st.s[w] - s
          else st.s[w] = select(2, range(st.e, edge, '+inf')) end  -- saturated: recount
        end
      end
      st.c[w], st.dirty = edge, true
    end
  end
end

-- A distinct set whose latest sighting the state does not hold (a state rebuilt after
-- Redis evicted it, or saved before the set had one): read from the set, once (review: a
-- rebuilt state let a late observation count sightings more than the longest window
-- behind the set's latest). None there is kept as false, so it is not read again.
for j = 1, nd do
  local st, of = DST[j], DOF[j]
  if not st.fresh and st.dn[of] == nil then
    local top = redis.call('ZRANGE', DKEY[j], -1, -1, 'WITHSCORES')
    st.dn[of], st.dirty = top[2] ~= nil and tonumber(top[2]), true
  end
end

local function tidy_due(x) return x == nil or math.abs(t - x) >= TIDY end

local function add(st)
  if t <= st.m - WINDOWS[L] then return end  -- older than anything a window can still reach
  local empty = st.n[L] == 0
  -- the set's TTL follows the state's (refreshed on every write, so volatile-ttl does not
  -- evict the sets first); 0 where the set is not there
  local had = not st.fresh and redis.call('EXPIRE', st.e, ttl) == 1
  if not had and not empty then  -- Redis evicted the events under their totals: drop them
    for w = 1, L do st.n[w], st.s[w] = 0, 0 end
    st.m, empty = -1, true
  end
  local member = AMOUNT .. ':' .. ID
  if redis.call('ZADD', st.e, 'NX', T, member) == 0 then
    -- already there: the order's marker was lost (evicted, or older than its TTL) and its
    -- event was not. Still in a window of t: counted once. Out of every window of t (not
    -- in the totals any more): recorded anew, as a new event.
    if tonumber(redis.call('ZSCORE', st.e, member)) > t - WINDOWS[L] then return end
    redis.call('ZADD', st.e, T, member)
  end
  for w = 1, L do
    if t > st.c[w] then st.n[w], st.s[w] = st.n[w] + 1, math.min(st.s[w] + amount, CAP) end
  end
  if t > st.m then st.m = t end
  st.dirty, st.exists = true, true
  if not had then
    redis.call('EXPIRE', st.e, ttl)
    st.x = t
  elseif empty or tidy_due(st.x) then
    redis.call('ZREMRANGEBYSCORE', st.e, '-inf', int(st.m - WINDOWS[L]))
    st.x = t
  end
end

local function add_distinct(j)
  local value = string.sub(f[7 + ns + nd + j], 2)
  if value == '' then return end
  local st, of = DST[j], DOF[j]
  local had = not st.fresh and redis.call('EXPIRE', DKEY[j], ttl) == 1  -- as add's
  if redis.call('ZADD', DKEY[j], 'GT', 'CH', T, value) == 0 then  -- seen at or after t
    DLATER[j] = tonumber(redis.call('ZSCORE', DKEY[j], value)) > t
  end
  DADD[j] = true
  if not st.dn[of] or t > st.dn[of] then st.dn[of], st.dirty = t, true end
  if not had then
    redis.call('EXPIRE', DKEY[j], ttl)
    st.dx[of], st.dirty = t, true
  elseif tidy_due(st.dx[of]) then
    redis.call('ZREMRANGEBYSCORE', DKEY[j], '-inf', int(st.dn[of] - WINDOWS[L]))
    st.dx[of], st.dirty = t, true
  end
end

-- of-values last seen in (t - W, t] and still kept, and the order's own one when this
-- call recorded it and it was last seen after t (in its window at t all the same)
local function distinct_count(j, w)
  if DST[j].fresh then return DADD[j] and 1 or 0 end  -- the one sighting is at t
  local lo, newest = EDGE[w], DST[j].dn[DOF[j]]
  if newest and newest - WINDOWS[L] > lo then lo = newest - WINDOWS[L] end
  local n = redis.call('ZCOUNT', DKEY[j], '(' .. int(lo), T)
  if DLATER[j] and t > lo then n = n + 1 end
  return n
end

local function save(st)  -- SET with EX: the state's TTL is refreshed on every write
  if not (st.dirty and st.exists) then return end
  local u = {}
  for w = 1, L do u[w], u[L + w], u[2 * L + w] = int(st.c[w]), int(st.n[w]), int(st.s[w]) end
  u[3 * L + 1], u[3 * L + 2] = int(st.m), int(st.x or -1)
  for of, newest in pairs(st.dn) do
    u[#u + 1] = of .. '=' .. int(st.dx[of] or -1) .. ',' .. int(newest or -1)
  end
  redis.call('SET', st.h, table.concat(u, ' '), 'EX', ttl)
end

local function window(st, w)  -- count and sum of the series' events in (t - W, t]
  local got = st.cache[w]
  if got then return got end
  -- older than anything a window can still reach: its window holds nothing that counts
  if t <= st.m - WINDOWS[L] then st.cache[w] = {0, 0}; return st.cache[w] end
  local n, s = st.n[w], st.s[w]
  local full = s >= CAP  -- saturated: the sum is counted from the window's own events
  local lo = math.max(EDGE[w], st.m - WINDOWS[L])
  if st.c[w] > lo then  -- a later observation moved the cursor past this window's edge
    local dn, ds = range(st.e, lo, st.c[w])
    n, s = n + dn, s + ds
    full = full or s >= CAP
  end
  if st.m > t then  -- events of later observations are not in this window
    if not st.after then st.after = {range(st.e, T, '+inf')} end
    n, s = n - st.after[1], s - st.after[2]
  end
  if full then s = select(2, range(st.e, math.min(lo, st.c[w]), T)) end
  got = {n, s}
  st.cache[w] = got
  return got
end

-- The order's marker: groups of "@" and a time (clock ms) followed by the tags of the
-- keys recorded then (8 hex digits of the key's CRC-32, sent per series) and, in the
-- group that claimed it, "!" and the order's content tag (8 characters in all: an older
-- script keeps it as a key's tag no key has). A key is not recorded again while its
-- group is younger than ttl; older groups are dropped. A bare time is an older script's
-- marker: the whole order was recorded then. An order sent with a content tag other than
-- the one claimed records nothing: false (the caller raises OtherContentError).
local function record()
  local marker, TAGS = P .. 'o:' .. ID, f[8 + ns + 2 * nd]
  local CONTENT = f[10 + ns + 2 * nd] or ''
  local done, keep, fresh, all, claimed = {}, {}, false, false, nil
  for word in string.gmatch(redis.call('GET', marker) or '', '%S+') do
    local b = string.byte(word)
    if b == 64 then fresh = tonumber(string.sub(word, 2)) > now - ttl * 1000
    elseif #word ~= 8 then
      fresh = tonumber(word) > now - ttl * 1000
      all = all or fresh
    end
    if fresh then
      keep[#keep + 1] = word
      done[word] = true
      if b == 33 then claimed = string.sub(word, 2) end
    end
  end
  if CONTENT ~= '' and claimed and claimed ~= CONTENT then return false end
  local claim = CONTENT ~= '' and not claimed
  local new = {}
  for i = 1, ns do
    local tag = string.sub(TAGS, 8 * i - 7, 8 * i)
    if not (all or done[tag]) then
      add(S[i])
      S[i].now, new[#new + 1] = true, tag
    end
  end
  for j = 1, nd do
    if DST[j].now then add_distinct(j) end
  end
  if #new > 0 or claim then
    keep[#keep + 1] = '@' .. f[4]
    if claim then keep[#keep + 1] = '!' .. CONTENT end
    for _, tag in ipairs(new) do keep[#keep + 1] = tag end
    redis.call('SET', marker, table.concat(keep, ' '), 'EX', ttl)
  end
  return true
end

if f[1] == '1' and not record() then return '!' end
for i = 1, ns do save(S[i]) end

local out = {}
local Q = f[9 + ns + 2 * nd]
for q = 1, #Q, 3 do
  local code, i, w = string.byte(Q, q, q + 2)
  i, w = i - 48, w - 48
  if code == 100 then out[#out + 1] = int(distinct_count(i, w))  -- d
  elseif code == 99 then out[#out + 1] = int(window(S[i], w)[1])  -- c
  else out[#out + 1] = int(window(S[i], w)[2]) end  -- s
end
return table.concat(out, ' ')  -- one bulk reply parses faster than an array
""".replace("@WINDOWS@", _LUA_WINDOWS)
    .replace("@TIDY@", str(_TIDY_MS))
    .replace("@CAP@", str(MAX_SUM))
)


class RedisFeatureStore:
    """A ``FeatureStore`` in Redis; see the module docstring.

    Args:
        url: ``redis://host:port/db``, or several: the shards (see the module docstring).
        clock: times the idempotency markers (an order id is remembered for
            ``SEEN_TTL_S`` clock seconds); windows end at ``Observation.at``.
            Key TTLs, which only reclaim memory, run on Redis's own clock.
        prefix: every key starts with it (one per deployment, one per test).
        timeout_s: the bound of one call, per shard it reaches: everything the call
            does (connecting, the handshake, EVALSHA, reloading the script after a
            Redis restart) shares it, each read waiting only for what is left, so a
            dead, stalled or slow Redis raises ``UnavailableError`` within
            ``timeout_s`` per shard (``shards * timeout_s`` at most; the scorer counts
            on it). No retries: the caller falls back, and the next call reconnects.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        clock: Clock,
        *,
        prefix: str = "riskd:f:",
        timeout_s: float = 0.05,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("RedisFeatureStore needs at least one URL")
        self._clock = clock
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._shards = [_Connections(_url_pool(u, i, timeout_s)) for i, u in enumerate(urls)]
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # what EVALSHA names it by
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

    @property
    def shards(self) -> int:
        return len(self._shards)

    def unreachable(self) -> list[tuple[int, str]]:
        """The shards (index in the URL list) that do not answer a ``PING``, each with the
        kind of error (``ConnectionError``, ``AuthenticationError``: never a URL)."""
        down = []
        for i, shard in enumerate(self._shards):
            try:
                conn = shard.take(time.monotonic() + self._timeout_s)
            except redis.RedisError as e:  # a host name not resolved in time
                down.append((i, type(e).__name__))
                continue
            try:
                conn.send_command("PING")
                conn.read_response()
            except redis.RedisError as e:
                conn.disconnect()
                down.append((i, type(e).__name__))
            else:
                shard.give_back(conn)
        return down

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def _call(
        self, obs: Observation, queries: Collection[FeatureQuery], *, record: bool
    ) -> dict[FeatureQuery, int]:
        # each key's CRC-32 picks its shard and is its tag in the order's marker
        crcs = {name: zlib.crc32(f"{name}:{value}".encode()) for name, value in obs.keys.items()}
        split = self._split(obs.order_id, crcs)
        # the content claim lives on the order id's home shard alone, which every
        # recording call with a tag reaches (a claim per shard let a refused call claim
        # on a shard the first content never reached, and then refuse the first content)
        home = self._home(obs.order_id)
        if record and obs.content and home not in {shard for shard, _ in split}:
            split.append((home, ()))
        parts = [(shard, self._plan_for(queries, names)) for shard, names in split]
        calls = [
            (shard, self._body(obs, plan, crcs, record=record, claim=shard == home))
            for shard, plan in parts
        ]
        try:
            replies = self._eval(obs.order_id, calls)
        except redis.RedisError as exc:
            kind = WritesRefusedError if _refuses_writes(exc) else UnavailableError
            raise kind(f"feature store: redis {type(exc).__name__}") from exc
        if record and obs.content and _CLAIMED in replies:  # nothing recorded there
            raise OtherContentError()
        result = dict.fromkeys(queries, 0)
        try:
            for (_, plan), reply in zip(parts, replies, strict=True):
                result.update(zip(plan.asked, map(int, reply.split()), strict=True))
        except (ValueError, AttributeError) as exc:  # not the script's reply: never INTERNAL
            raise UnavailableError("feature store: unreadable redis reply") from exc
        return result

    def _split(self, order_id: str, crcs: Mapping[str, int]) -> list[tuple[int, tuple[str, ...]]]:
        """The order's key names (with their CRC-32s) by shard (one shard: all of them)."""
        n = len(self._shards)
        if n == 1:
            return [(0, tuple(crcs))]
        names: dict[int, list[str]] = {}
        for name, crc in crcs.items():
            names.setdefault(crc % n, []).append(name)
        if not names:  # no keys: only the order's marker, on the order id's shard
            return [(self._home(order_id), ())]
        return [(shard, tuple(group)) for shard, group in sorted(names.items())]

    def _home(self, order_id: str) -> int:
        """The order id's home shard: where its content claim lives (its CRC-32)."""
        n = len(self._shards)
        return 0 if n == 1 else zlib.crc32(order_id.encode()) % n

    def _eval(self, order_id: str, calls: Sequence[tuple[int, str]]) -> list[bytes]:
        """EVALSHA per shard, all sent before any is read; the script is loaded again
        on a shard that lost it (a Redis restart).

        Straight on the connections (``_Connections``), not through ``Redis.execute_command``
        and its connection pool: about half the client CPU per call (no retry wrapper,
        no reply callbacks, no pool bookkeeping). The call has one deadline, ``timeout_s``
        per shard: a connect, the handshake's reads (``_handshake``) and every read here
        wait only for what is left of it, so the round trips of one call (connect,
        SELECT, EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA) cannot add up past it.
        """
        deadline = time.monotonic() + self._timeout_s * len(calls)
        taken: list[tuple[_Connections, Any]] = []  # redis-py types its connections loosely
        try:
            for shard, body in calls:
                conns = self._shards[shard]
                conn = conns.take(deadline)
                taken.append((conns, conn))
                conn.send_command("EVALSHA", self._sha, 0, self._prefix, order_id, body)
            replies: list[bytes] = []
            for (_, conn), (_, body) in zip(taken, calls, strict=True):
                try:
                    replies.append(cast(bytes, conn.read_response(timeout=_left(deadline))))
                except NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", _SCRIPT)
                    conn.read_response(timeout=_left(deadline))
                    conn.send_command("EVALSHA", self._sha, 0, self._prefix, order_id, body)
                    replies.append(cast(bytes, conn.read_response(timeout=_left(deadline))))
        except BaseException:
            for _, conn in taken:
                conn.disconnect()  # a late reply may still arrive: never reuse this socket
            raise
        for conns, conn in taken:
            conns.give_back(conn)
        return replies

    def _body(
        self, obs: Observation, plan: _Plan, crcs: Mapping[str, int], *, record: bool, claim: bool
    ) -> str:
        """The script's newline-terminated fields (see ``_SCRIPT``); ``claim``: this shard
        keeps the order's content claim (its home shard), else no tag is sent."""
        keys = obs.keys
        now = to_ms(self._clock.now())
        fields = [str(int(record)), str(obs.at_ms), str(obs.amount), str(now), plan.head]
        fields += (f"{name}:{keys[name]}" for name in plan.names)
        fields += (f"{k}:{of}:{keys[k]}" for k, of in plan.pairs)
        fields += ("=" + keys.get(of, "") for _, of in plan.pairs)
        # a key's tag in the order's marker: 8 hex digits of the CRC-32 of "name:value"
        fields.append("".join(f"{crcs[name]:08x}" for name in plan.names))
        fields.append(plan.tail + (obs.content if claim else "") + "\n")  # tail ends its field
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


def _lean_handshake() -> dict[str, Any]:
    """Connection options for a handshake of no round trips of its own (AUTH and SELECT
    where the URL asks for them): RESP2 (no HELLO; redis-py's maintenance notifications
    need RESP3, so none are set up) and no CLIENT SETINFO. A new connection after a
    restart then costs the call its connect and nothing else before EVALSHA."""
    base = getattr(redis.connection, "AbstractConnection", redis.Connection)
    params = inspect.signature(base.__init__).parameters
    if "driver_info" in params:  # redis-py 8: lib_name and lib_version are deprecated
        return {"protocol": 2, "driver_info": None}
    return {"protocol": 2, "lib_name": None, "lib_version": None}


_LEAN_HANDSHAKE = _lean_handshake()


def _url_pool(url: str, index: int, timeout_s: float) -> redis.ConnectionPool:
    """redis-py's pool for ``url``, with a connection made (not connected) so that every
    option of the URL's query is parsed now.

    Raises:
        ConfigError: naming ``redis_url`` and the shard; an option redis-py refuses
            (``?socket_timeout=abc``, ``?ssl_cert_reqs=bogus``) is refused at start, not
            on the first order (review: a traceback after the keyring was created).
    """
    try:
        pool = redis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            **_LEAN_HANDSHAKE,
        )
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError, redis.RedisError) as e:
        text = str(e)
        for secret in _secrets(url):  # redis-py quotes some option values
            text = text.replace(secret, "***")
        raise ConfigError(f"redis_url: shard {index + 1}: {text}") from None
    return pool


def _secrets(url: str) -> list[str]:
    """The URL's passwords, longest first: never in a message. Its user part is taken
    as everything before the last ``@``, its password after the first ``:`` (review: a
    password with an unencoded ``#``, ``/`` or ``?`` is no password to ``urlsplit``,
    and redis-py's message quoted what came before it; one with ``[`` made ``urlsplit``
    raise)."""
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    values = [password, re.split(r"[#/?]", password)[0]]  # what a parser cut it to
    with contextlib.suppress(ValueError):
        values += [v for k, v in parse_qsl(urlsplit(url).query) if "pass" in k.lower()]
    values += [unquote(v) for v in values]
    return sorted({v for v in values if v}, key=len, reverse=True)


# Redis's replies that refuse every write for now, whatever the script was given: a
# replica (READONLY), maxmemory reached (OOM), failing snapshots (MISCONF), too few
# replicas (NOREPLICAS), a replica cut from its master or a dataset loading
_REFUSING: tuple[type[redis.RedisError], ...] = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.MasterDownError,
)
_REFUSING_CODES = ("READONLY", "OOM", "MISCONF", "NOREPLICAS", "LOADING", "MASTERDOWN")


def _refuses_writes(error: redis.RedisError) -> bool:
    """Is ``error`` Redis refusing every write now (``WritesRefusedError``)? A write the
    script makes is refused with the command's own error code (Redis 7)."""
    if isinstance(error, _REFUSING):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith(_REFUSING_CODES)


def _left(deadline: float) -> float:
    """Seconds left before ``deadline`` (monotonic); redis's TimeoutError once none are."""
    left = deadline - time.monotonic()
    if left <= 0.0005:  # 0 would make redis-py's read a non-blocking poll
        raise redis.TimeoutError("feature store call bound spent")
    return left


def _is_name(host: object) -> bool:
    """Whether ``host`` is a host name (resolved on connecting), not an IP address."""
    if not isinstance(host, str) or not host:
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return False


def _handshake(conn: Any) -> None:
    """redis-py's ``redis_connect_func``: its own handshake, whose reads (AUTH, SELECT:
    see ``_lean_handshake``) share what is left of the call's bound; a connection made
    aside (``riskd_deadline`` None: its caller waits for it no longer than its own bound)
    gets a bound of its own from now, the name resolved."""
    reads = bool(conn.username or conn.password or conn.credential_provider) + bool(conn.db)
    if reads:
        deadline = conn.riskd_deadline
        if deadline is None:
            deadline = time.monotonic() + conn.socket_connect_timeout
        conn._sock.settimeout(_left(deadline) / reads)
    conn.on_connect()
    conn._sock.settimeout(conn.socket_timeout)  # sends: bounded as before


class _Connections:
    """One shard's idle connections, for one call at a time each.

    redis-py's ``ConnectionPool`` spends about 16 µs of CPU per call taking and giving
    back a connection (locks, observability counters, events); this keeps a deque
    (thread-safe appends and pops) of the connections that finished a call cleanly. A
    call that fails disconnects its connections and does not give them back, so an
    idle connection never holds part of a reply. One taken from the deque is checked
    first as the pool does (a poll): one the server has closed meanwhile (a restart, an
    idle timeout) is reconnected instead of failing the call, within what is left of the
    call's bound (``take``'s deadline: the connect and ``_handshake``).

    A host name is resolved as the connection is made (``getaddrinfo``), which no socket
    timeout bounds: a resolver that does not answer (a partition, a DNS failover) held
    each call for its own timeout (review: 2,002 ms against a 100 ms deadline, for every
    call until the breaker opened). So a shard named by host name connects on a thread of
    its own, waited for within the call's bound; one still out then makes the next
    connects fail at once (no thread piles up behind a dead resolver), and the
    connection it makes in the end is kept for the next call. An IP address or a Unix
    socket connects on the caller's thread, as before (no resolution, no thread hop).
    """

    def __init__(self, url_pool: redis.ConnectionPool) -> None:
        # redis-py's pool parses the URL (host, TLS, auth, db); its connections are not used
        self._new = url_pool.connection_class
        self._kwargs = {**url_pool.connection_kwargs, "redis_connect_func": _handshake}
        self._timeout_s = self._kwargs["socket_connect_timeout"]
        self._idle: deque[Any] = deque()
        self._named = _is_name(self._kwargs.get("host"))
        self._lock = threading.Lock()
        self._late = 0  # connects (host names) still out past their caller's bound
        self._closed = False

    def take(self, deadline: float) -> Any:
        """A connection for one call; one that must connect (on its first command) does
        so within what is left before ``deadline``."""
        try:
            conn = self._idle.pop()
        except IndexError:  # not connected yet: connects on its first command
            conn = self._new(**self._kwargs)
        else:
            try:
                if conn.can_read():  # readable while idle: end of file (closed by the server)
                    conn.disconnect()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                conn.disconnect()
        if not conn.is_connected:
            conn.socket_connect_timeout = min(self._timeout_s, _left(deadline))
            conn.riskd_deadline = deadline  # for _handshake
            if self._named:
                self._connect_aside(conn, deadline)
        return conn

    def _connect_aside(self, conn: Any, deadline: float) -> None:
        """Connect ``conn`` on a thread of its own, waiting until ``deadline`` at most.

        Raises:
            redis.TimeoutError: not connected in time, or an earlier connect is still out
                (the name did not resolve in time: no other thread is started meanwhile).
        """
        with self._lock:
            if self._late:
                raise redis.TimeoutError("connecting: the host name did not resolve in time")
        state: dict[str, Any] = {}
        done = threading.Event()
        # its own bounds, from the name resolved: the caller waits no longer than its own
        # (review: with AUTH or SELECT, a resolver slower than the bound made each late
        # connect's handshake fail past the call's deadline, and Redis was never reached)
        conn.socket_connect_timeout, conn.riskd_deadline = self._timeout_s, None

        def connect() -> None:
            try:
                conn.connect()
            except BaseException as e:  # the caller's to raise, or dropped when late
                state["error"] = e
            with self._lock:
                late = state["late"] = state.get("late", False)
                if late:
                    self._late -= 1
                keep = late and "error" not in state and not self._closed
                done.set()
            if keep:  # the connection a dead resolver held up: kept for the next call
                self._idle.append(conn)
            elif late:
                conn.disconnect()

        threading.Thread(target=connect, name="riskd-redis-connect", daemon=True).start()
        done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if not done.is_set():
                state["late"] = True
                self._late += 1
                raise redis.TimeoutError("connecting: the host name did not resolve in time")
        if "error" in state:
            raise state["error"]

    def give_back(self, conn: Any) -> None:
        self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while self._idle:
            self._idle.pop().disconnect()


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a query set asks of an order carrying these key names, in script order."""

    names: tuple[str, ...]  # the key names it records and reads, in script order
    pairs: tuple[tuple[str, str], ...]  # distinct sets to read (and record)
    asked: tuple[FeatureQuery, ...]  # the queries the script answers, in its order
    head: str  # the "ttl, #series, #distinct" fields
    tail: str  # the queries' field (three bytes each), newline-terminated

    @staticmethod
    def make(queries: Collection[FeatureQuery], names: tuple[str, ...]) -> _Plan:
        present = set(names)
        pairs = sorted(
            {(q.key, q.of) for q in queries if q.agg is Agg.DISTINCT and q.key in present}
        )
        series = {name: i + 1 for i, name in enumerate(names)}
        distinct = {pair: j + 1 for j, pair in enumerate(pairs)}
        asked = tuple(q for q in set(queries) if q.key in present)
        # indexes count keys (a handful) and their distinct pairs: one ASCII byte each
        assert max(len(series), len(distinct)) < 80, "too many keys for one-byte indexes"
        codes = [
            _AGG_CODE[q.agg]
            + chr(48 + (distinct[(q.key, q.of)] if q.agg is Agg.DISTINCT else series[q.key]))
            + chr(48 + _WINDOW_INDEX[q.window])
            for q in asked
        ]
        head = f"{SEEN_TTL_S}\n{len(names)}\n{len(pairs)}"
        return _Plan(names, tuple(pairs), asked, head, "".join(codes) + "\n")
