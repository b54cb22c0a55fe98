-- hpush: PUT /<path> with the object as the body; the ETL answers 200 + transformed bytes.
--   wrk -s hpush.lua http://127.0.0.1:PORT -- SIZE [PATH]
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")

function init(args)
   wrk.method = "PUT"
   wrk.path = args[2] or "/b/obj"
   wrk.body = common.body(tonumber(args[1]))
   wrk.headers["Content-Type"] = "application/octet-stream"
end
