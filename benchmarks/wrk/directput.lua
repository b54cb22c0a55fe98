-- direct put: PUT /<path> with the object as the body and an Ais-Node-Url header naming the
-- destination; the ETL PUTs the result to <node>/v1/etl/_object/<etl>/<secret>/<uname>?... (the
-- nginx sink) and answers 204 + Ais-Direct-Put-Length.
--   wrk -s directput.lua http://127.0.0.1:PORT -- SIZE NODE_URL [PATH]
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")

function init(args)
   wrk.method = "PUT"
   wrk.path = args[3] or "/b/obj"
   wrk.body = common.body(tonumber(args[1]))
   wrk.headers["Content-Type"] = "application/octet-stream"
   wrk.headers["Ais-Node-Url"] = args[2]
end
