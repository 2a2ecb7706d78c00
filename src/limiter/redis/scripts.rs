//! The Lua scripts, and the numbers they take and answer.
//!
//! Every script is [`algorithm`](crate::limiter::algorithm) line for line, in
//! whole microseconds since the Unix epoch from Redis's own `TIME`, so that
//! replicas with skewed clocks agree and windows fall on the same epoch
//! multiples as the memory backend's. Lua numbers are doubles: every value
//! stays below 2^53 (µs since the epoch are about 2^51, a sliding window's
//! `n * window_ms` is capped at 2^53 by [`Limit::window`](crate::Limit)), and
//! integer division is `(a - fmod(a, b)) / b`, exact where `floor(a / b)`
//! could round up.
//!
//! A limit is three numbers in the scripts: its algorithm's code and two
//! parameters ([`Params`]). The state of one (limit, key) is one string:
//!
//! | algorithm | code | parameters | value |
//! | --- | --- | --- | --- |
//! | gcra | 0 | `t`, `tau` (µs) | the TAT (as before several algorithms existed) |
//! | fixed_window | 1 | `n`, window (µs) | `<window end>:<count>` |
//! | sliding_window | 2 | `n`, window (µs) | `<end of the window after>:<current>:<previous>` |
//!
//! and every key expires when its state stops mattering (`PX` = the state's
//! `expires` − now), so Redis holds only active clients.

use super::super::algorithm::{Counter, State};

/// One limit in the scripts' units: `code` and two parameters (see the
/// module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub code: u8,
    pub p: u64,
    pub q: u64,
}

impl Params {
    pub fn of(counter: &Counter) -> Self {
        match *counter {
            Counter::Gcra(g) => Params {
                code: 0,
                p: g.t,
                q: g.tau,
            },
            Counter::FixedWindow(f) => Params {
                code: 1,
                p: f.n,
                q: f.window,
            },
            Counter::SlidingWindow(s) => Params {
                code: 2,
                p: s.n,
                q: s.window,
            },
        }
    }
}

/// A state as the scripts answer it (`expires`, then two counts; all 0 for
/// no state), in [`State`]'s layout.
pub fn state(code: u8, expires: i64, a: i64, b: i64) -> Option<State> {
    let expires = u64::try_from(expires).ok().filter(|&e| e > 0)?;
    let a = u64::try_from(a).unwrap_or(0);
    let b = u64::try_from(b).unwrap_or(0);
    let count = match code {
        0 => 0,
        1 => a,
        _ => (b.min(0xffff_ffff) << 32) | a.min(0xffff_ffff),
    };
    Some(State { expires, count })
}

/// The shared part of every script: the clock, integer division, and
/// reading one key's state.
macro_rules! prelude {
    () => {
        r#"
if redis.replicate_commands then redis.replicate_commands() end
-- One clock for every replica: µs since the Unix epoch.
local now = redis.call('TIME')
local t0 = tonumber(now[1]) * 1000000 + tonumber(now[2])
local fmod = math.fmod
-- a / b rounded down, exactly (a >= 0).
local function idiv(a, b) return (a - fmod(a, b)) / b end
-- A key's state {expires, a, b}, or false; `Stripe::get`: expired is none.
local function read(key, code)
  local v = redis.call('GET', key)
  if not v then return false end
  local s = false
  if code == 0 then
    local tat = tonumber(v)
    if tat then s = {tat, 0, 0} end
  else
    local e, a, b = string.match(v, '^(%d+):(%d+):?(%d*)$')
    if e then s = {tonumber(e), tonumber(a), tonumber(b) or 0} end
  end
  if s and s[1] <= t0 then return false end
  return s
end
local function write(key, code, s)
  local v
  if code == 0 then v = string.format('%d', s[1])
  elseif code == 1 then v = string.format('%d:%d', s[1], s[2])
  else v = string.format('%d:%d:%d', s[1], s[2], s[3]) end
  -- Once expires <= now the state is indistinguishable from none.
  redis.call('SET', key, v, 'PX', math.ceil((s[1] - t0) / 1000))
end
-- SlidingWindow::counts: (index of the window holding `at`, current, previous).
local function counts(s, window, at)
  local w = idiv(at, window)
  if not s then return w, 0, 0 end
  local counted = idiv(s[1], window) - 2
  if counted == w then return w, s[2], s[3] end
  if counted + 1 == w then return w, 0, s[2] end
  return w, 0, 0
end
"#
    };
}

/// Decides a batch of requests, each all-or-nothing over its limits.
///
/// `KEYS` are every entry's key, request after request. `ARGV` holds per
/// request: its number of entries `m`, `1` to charge it (`0`: only look),
/// then per entry the limit's code and two parameters. Requests are decided
/// in order; a request is charged only if every entry allows it
/// (`Counter::step` of each on the state as the batch left it, an entry for
/// a key already charged in the same request seeing that charge, as the
/// memory backend's `decide_many`). The same key in a later request sees the
/// earlier one's charge.
///
/// Answers `TIME` in µs, then per request `1` if charged (else `0`) and per
/// entry the state it was decided on (`expires`, two counts; `0, 0, 0` for
/// none): the caller runs `Counter::step`/`peek` on it to report the same
/// decision the memory backend would, so the reporting arithmetic (retry
/// times, remaining cells) exists once, in Rust.
///
/// Redis runs this for every request, so it is lean: each distinct key is
/// read once and written once per batch (a client sending many requests at
/// once costs one GET and one SET), one string value per key, formatted
/// only when written.
pub const DECIDE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local held = {}
local codes = {}
local changed = {}
local nchanged = 0
local function load(key, code)
  local s = held[key]
  if s == nil then
    s = read(key, code)
    held[key] = s
    codes[key] = code
  end
  return s
end
-- Counter::step: the state after charging, or nil when refused.
local function step(code, p, q, s)
  if code == 0 then
    -- Gcra::step (t = p, tau = q): let tat = state.map_or(now, |s| s.expires);
    local tat = s and s[1] or t0
    -- if now < tat - tau: refused
    if t0 < tat - q then return nil end
    -- let next = tat.max(now) + t;
    return {(tat > t0 and tat or t0) + p, 0, 0}
  elseif code == 1 then
    -- FixedWindow::current (n = p, window = q): end = (now / window + 1) * window
    local e = t0 - fmod(t0, q) + q
    local count = (s and s[1] == e) and s[2] or 0
    if count >= p then return nil end
    return {e, count + 1, 0}
  else
    -- SlidingWindow::step (n = p, window = q)
    local w, cur, prev = counts(s, q, t0)
    -- weighted: floor(prev * (window_ms - elapsed_ms) / window_ms)
    local wms = math.max(idiv(q, 1000), 1)
    local elapsed = math.min(idiv(t0 - w * q, 1000), wms)
    local estimate = cur + idiv(prev * (wms - elapsed), wms)
    if estimate + 1 > p then return nil end
    return {(w + 2) * q, cur + 1, prev}
  end
end
local out = {t0}
local k = 1
local i = 1
while i <= #ARGV do
  local m = tonumber(ARGV[i])
  local charge = ARGV[i + 1] == '1'
  i = i + 2
  local flag = #out + 1
  out[flag] = 0
  local tentative = {}
  local allowed = true
  for j = 0, m - 1 do
    local key = KEYS[k + j]
    local code = tonumber(ARGV[i])
    local s = tentative[key]
    if s == nil then s = load(key, code) end
    local n = #out
    if s then
      out[n + 1] = s[1]; out[n + 2] = s[2]; out[n + 3] = s[3]
    else
      out[n + 1] = 0; out[n + 2] = 0; out[n + 3] = 0
    end
    local next = step(code, tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), s)
    if next then tentative[key] = next else allowed = false end
    i = i + 3
  end
  if allowed and charge then
    out[flag] = 1
    for key, s in pairs(tentative) do
      held[key] = s
      if not changed[key] then
        changed[key] = true
        nchanged = nchanged + 1
        changed[nchanged] = key
      end
    end
  end
  k = k + m
end
for j = 1, nchanged do
  local key = changed[j]
  write(key, codes[key], held[key])
end
return out
"#
);

/// Takes back one charge per key from requests a later slot of a Redis
/// Cluster refused (see the module docs of `redis`).
///
/// `KEYS[i]` is a key; `ARGV[3i-2]` its code, `ARGV[3i-1]` the limit's `t`
/// (GCRA) or window (µs), `ARGV[3i]` the `expires` of the state the charge
/// wrote (which window it counted in). GCRA: `tat - t` (at most one cell
/// back, and nothing once the key expired). Windows: one off the count of
/// the window charged, if that window still counts (as the current or the
/// sliding window's previous one). Never gives back more than was taken, so
/// a limit never admits more than it allows. Returns the keys seen.
pub const REFUND_SCRIPT: &str = concat!(
    prelude!(),
    r#"
for i = 1, #KEYS do
  local key = KEYS[i]
  local code = tonumber(ARGV[3 * i - 2])
  local p = tonumber(ARGV[3 * i - 1])
  local e = tonumber(ARGV[3 * i])
  local s = read(key, code)
  if s then
    if code == 0 then
      local back = s[1] - p
      -- Back to a fresh key's state: expire it at once (GET and SET are
      -- all the commands the scripts need an ACL to allow).
      if back > t0 then write(key, 0, {back, 0, 0}) else redis.call('SET', key, '0', 'PX', 1) end
    elseif s[1] == e and s[2] > 0 then
      s[2] = s[2] - 1
      write(key, code, s)
    elseif code == 2 and s[1] == e + p and s[3] > 0 then
      s[3] = s[3] - 1
      write(key, code, s)
    end
  end
end
return #KEYS
"#
);

/// Adds requests admitted elsewhere (by this replica while Redis could not
/// answer) to keys' states: `Counter::charge`. `KEYS[i]` is a key;
/// `ARGV[5i-4]` its code, `ARGV[5i-3]` and `ARGV[5i-2]` the limit's
/// parameters, `ARGV[5i-1]` the count `n`, `ARGV[5i]` how long ago (µs) the
/// first of them was admitted. As if the `n` requests had come back to back
/// when the first did: GCRA `tat = max(tat, first) + n * t`, which is never
/// later than the local table's own TAT after them, so a charged key is never
/// locked out longer than this replica itself would have locked it; windows
/// add `n` to the count of the window holding the first. What other
/// replicas took meanwhile is kept. Returns the keys charged.
pub const CHARGE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
for i = 1, #KEYS do
  local key = KEYS[i]
  local code = tonumber(ARGV[5 * i - 4])
  local p = tonumber(ARGV[5 * i - 3])
  local q = tonumber(ARGV[5 * i - 2])
  local n = tonumber(ARGV[5 * i - 1])
  local first = t0 - tonumber(ARGV[5 * i])
  local s = read(key, code)
  local next
  if code == 0 then
    -- Gcra::charge: max(tat, first) + n * t
    local tat = s and s[1] or first
    if tat < first then tat = first end
    next = {tat + n * p, 0, 0}
  elseif code == 1 then
    -- FixedWindow::charge
    local e = first - fmod(first, q) + q
    local count = (s and s[1] == e) and s[2] or 0
    next = {e, count + n, 0}
  else
    -- SlidingWindow::charge
    local w, cur, prev = counts(s, q, first)
    next = {(w + 2) * q, math.min(cur + n, 4294967295), prev}
  end
  if next[1] > t0 then write(key, code, next) end
end
return #KEYS
"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::algorithm::{FixedWindow, Gcra, SlidingWindow};

    #[test]
    fn params_and_states_round_trip_the_scripts_layout() {
        let g = Counter::Gcra(Gcra { t: 6, tau: 54 });
        assert_eq!(
            Params::of(&g),
            Params {
                code: 0,
                p: 6,
                q: 54
            }
        );
        let f = Counter::FixedWindow(FixedWindow { n: 5, window: 60 });
        assert_eq!(Params::of(&f).code, 1);
        let s = Counter::SlidingWindow(SlidingWindow { n: 5, window: 60 });
        assert_eq!(
            Params::of(&s),
            Params {
                code: 2,
                p: 5,
                q: 60
            }
        );
        assert_eq!(state(0, 0, 0, 0), None);
        assert_eq!(
            state(2, 120, 3, 5),
            Some(State {
                expires: 120,
                count: (5 << 32) | 3
            })
        );
        assert_eq!(state(1, 60, 4, 0).unwrap().count, 4);
    }
}
