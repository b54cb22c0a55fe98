-- hpull: GET /<escaped uname> without etl_fqn; the ETL GETs the object from AIS_TARGET_URL
-- (the nginx fake target) and answers 200 + transformed bytes.
--   wrk -s hpull.lua http://127.0.0.1:PORT -- PATH      (e.g. /ais%2F@%23%2Fb%2Fobj1024)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")

function init(args)
   wrk.method = "GET"
   wrk.path = args[1]
end
