-- wrk script: POST bodies read from BODIES_FILE (one JSON body per line) in turn; on exit, print a JSON
-- summary line (prefixed "RESULT ") with throughput, latency percentiles in ms and error counts.
local bodies = {}
local path = os.getenv("BODIES_FILE")
for line in io.lines(path) do
  if #line > 0 then table.insert(bodies, line) end
end
local target = os.getenv("TARGET_PATH") or "/embed"
local counter = 0

request = function()
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]
  return wrk.format("POST", target, {["Content-Type"] = "application/json"}, body)
end

local statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, ' ..
    '"mean_ms": %.3f, "socket_errors": %d, "non_2xx": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3, errors, summary.errors.status))
end
