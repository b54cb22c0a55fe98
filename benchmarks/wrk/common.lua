-- Shared by hpush.lua, hpull.lua and directput.lua (loaded with dofile from the script's folder).
-- Playing the AIS target: every connection sends one request and waits for its reply (closed loop).
-- done() prints one machine-readable line, "BENCH_JSON {...}", read by side_by_side.py.
-- No response() callback on purpose: defining one makes wrk hand every reply (headers and body,
-- up to 16 MiB) to Lua, which costs more than the servers being measured. Non-2xx/3xx replies are
-- counted by wrk itself (summary.errors.status, any status > 399); side_by_side.py checks each
-- server's exact status and body with a single request before the cell.

local common = {}

-- Object body of `size` bytes (not all one byte value, so compression tricks would not help).
function common.body(size)
   local unit = "0123456789abcdef"
   local body = string.rep(unit, math.floor(size / #unit))
   return body .. string.sub(unit, 1, size - #body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
      '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
      '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"max":%.0f,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end

return common
