-- wrk script: GET /api/v1/members/{n}/balance for random known members. Environment: BENCH_KEY, BENCH_MEMBERS.

local key = os.getenv("BENCH_KEY")
local members = {}
for line in io.lines(os.getenv("BENCH_MEMBERS")) do
  members[#members + 1] = line
end
local headers = { ["Authorization"] = "Api-Key " .. key }
local threads = {}
ok, failed = 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + #threads)
end

function request()
  return wrk.format("GET", "/api/v1/members/" .. members[math.random(1, #members)] .. "/balance", headers)
end

function response(status, hdrs, body)
  if status == 200 then
    ok = ok + 1
  else
    failed = failed + 1
    if failed <= 3 then
      io.stderr:write("balance: HTTP " .. status .. ": " .. string.sub(body, 1, 300) .. "\n")
    end
  end
end

function done(summary, latency, requests)
  local o, f = 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok")
    f = f + t:get("failed")
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT created=%d failed=%d answered=%d seconds=%.3f p50_ms=%.2f p95_ms=%.2f p99_ms=%.2f "
      .. "socket_errors=%d timeouts=%d\n",
    o, f, o + f, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, e.connect + e.read + e.write, e.timeout))
end
