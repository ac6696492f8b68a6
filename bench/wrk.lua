-- wrk script of the benchmark (bench/harness.py sets it up through the environment):
--   BENCH_METHOD, BENCH_BODY   the request (a POST with a small JSON body, say)
--   BENCH_RATE                 pace to this many requests/s (the harness runs wrk with -t1)
--   BENCH_DISTINCT, BENCH_PATH request BENCH_PATH .. n for n in 0 .. BENCH_DISTINCT-1, in turn
-- and prints one line "BENCH_JSON {...}" the harness reads.

wrk.method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY")
if body and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate then
  -- Pacing: every request gets the next slot of one schedule, 1/rate apart, and waits for it
  -- (wrk calls delay() before each request).  The schedule is absolute, so rounding to whole
  -- milliseconds does not add up, and a slow answer does not lower the rate (later requests
  -- catch up), as long as the connections are enough to absorb it.  Latency is timed from the
  -- moment a request is actually written.
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval = 1000 / rate
  local slot = nil
  function delay()
    local now = now_ms()
    slot = (slot or now) + interval
    local wait = slot - interval - now
    if wait < 0 then
      return 0
    end
    return math.floor(wait)
  end
end

local distinct = tonumber(os.getenv("BENCH_DISTINCT") or "")
if distinct then
  local prefix = os.getenv("BENCH_PATH") or "/"
  local n = -1
  function request()
    n = (n + 1) % distinct
    return wrk.format(nil, prefix .. n)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
