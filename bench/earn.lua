-- wrk script: POST /api/v1/transactions, purchases of 1-3 lines by known members, each with a unique external_id.
-- Environment: BENCH_KEY, BENCH_MEMBERS (file, one number a line), BENCH_RUN (unique prefix), BENCH_QUOTA (purchases
-- per wrk thread), BENCH_OCCURRED_AT. Each thread sends exactly BENCH_QUOTA purchases, then stops once all of
-- them are answered, so the count of purchases in the database must equal the 201s counted here. While its last
-- purchases are in flight a connection sends GET /bench-filler (a cheap 404) instead, told apart by status. A thread
-- that is done touches BENCH_DONE_DIR/<thread>, so bench/run can end wrk at once rather than after its -d bound.

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]])
local function now_s()
  local ts = ffi.new("bench_timespec")
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC: the same clock in every thread
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local threads = {}
local counter = 1

function setup(thread)
  thread:set("tid", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

local key = os.getenv("BENCH_KEY")
local run = os.getenv("BENCH_RUN")
local quota = tonumber(os.getenv("BENCH_QUOTA"))
local occurred_at = os.getenv("BENCH_OCCURRED_AT")
local members = {}
for line in io.lines(os.getenv("BENCH_MEMBERS")) do
  members[#members + 1] = line
end

local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Api-Key " .. key }
local filler = nil
sent, created, failed, answered, started, finished = 0, 0, 0, 0, 0, 0
local done_dir = os.getenv("BENCH_DONE_DIR")

function init(args)
  math.randomseed(tid * 7919 + os.time())
  filler = wrk.format("GET", "/bench-filler", headers)
end

local function cents(n)
  return string.format("%d.%02d", math.floor(n / 100), n % 100)
end

local verified = false

function request()
  -- wrk calls request() once on the first thread's state before any connection, to check the script; that call
  -- must not use up a purchase.
  if tid == 1 and not verified then
    verified = true
    return filler
  end
  if sent >= quota then
    return filler
  end
  if sent == 0 then
    started = now_s()
  end
  sent = sent + 1
  local nlines = math.random(1, 3)
  local lines, total = {}, 0
  for i = 1, nlines do
    local qty = math.random(1, 3)
    local unit = math.random(500, 40000)
    local amount = qty * unit
    total = total + amount
    lines[i] = string.format(
      '{"sku":"SKU-%d","category":"cat-%d","quantity":"%d","unit_price":"%s","amount":"%s"}',
      math.random(1, 5000), math.random(1, 40), qty, cents(unit), cents(amount))
  end
  local body = string.format(
    '{"external_id":"%s-%d-%d","store":"store-%d","channel":"pos","member":"%s","type":"purchase",'
      .. '"occurred_at":"%s","currency":"SEK","total":"%s","lines":[%s]}',
    run, tid, sent, math.random(1, 50), members[math.random(1, #members)], occurred_at, cents(total),
    table.concat(lines, ","))
  return wrk.format("POST", "/api/v1/transactions", headers, body)
end

function response(status, hdrs, body)
  if status == 404 then
    return
  end
  answered = answered + 1
  if status == 201 then
    created = created + 1
  else
    failed = failed + 1
    if failed <= 3 then
      io.stderr:write("earn: HTTP " .. status .. ": " .. string.sub(body, 1, 300) .. "\n")
    end
  end
  if answered == quota then
    finished = now_s()
    if done_dir then
      io.open(done_dir .. "/" .. tid, "w"):close()
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local c, f, a, first, last, incomplete = 0, 0, 0, math.huge, 0, false
  for _, t in ipairs(threads) do
    incomplete = incomplete or t:get("finished") == 0
    c = c + t:get("created")
    f = f + t:get("failed")
    a = a + t:get("answered")
    first = math.min(first, t:get("started"))
    last = math.max(last, t:get("finished"))
  end
  if incomplete then
    last = first + summary.duration / 1e6 -- a thread did not finish its quota: wrk's -d bound ended it
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT created=%d failed=%d answered=%d seconds=%.3f p50_ms=%.2f p95_ms=%.2f p99_ms=%.2f "
      .. "socket_errors=%d timeouts=%d\n",
    c, f, a, last - first, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, e.connect + e.read + e.write, e.timeout))
end
