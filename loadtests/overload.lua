-- wrk script for overload runs: like post.lua, and counts 200, 429 and other statuses across threads.
local threads = {}
function setup(thread) table.insert(threads, thread) end

local bodies = {}
for line in io.lines(os.getenv("BODIES_FILE")) do
  if #line > 0 then table.insert(bodies, line) end
end
local counter = 0
c200, c429, cother = 0, 0, 0
-- DELAY_MS: pause each connection this long before its next request, which sets the offered rate
-- (connections x 1000 / DELAY_MS per second while answers are fast); unset: as fast as answered.
local pause = tonumber(os.getenv("DELAY_MS") or "")
if pause then
  delay = function() return pause end
end

request = function()
  counter = counter + 1
  return wrk.format("POST", "/embed", {["Content-Type"] = "application/json"}, bodies[(counter % #bodies) + 1])
end

response = function(status, headers, body)
  if status == 200 then c200 = c200 + 1 elseif status == 429 then c429 = c429 + 1 else cother = cother + 1 end
end

done = function(summary, latency, requests)
  local ok, refused, other = 0, 0, 0
  for _, thread in ipairs(threads) do
    ok = ok + thread:get("c200"); refused = refused + thread:get("c429"); other = other + thread:get("cother")
  end
  io.write(string.format('RESULT {"requests": %d, "seconds": %.3f, "ok": %d, "refused": %d, "other": %d, ' ..
    '"socket_errors": %d, "p99_ms": %.3f}\n', summary.requests, summary.duration / 1e6, ok, refused, other,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(99) / 1e3))
end
