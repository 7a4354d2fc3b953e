-- The login flood: POST /token with the OAuth2 password form and the right password, so every
-- request costs one bcrypt verification and none counts as a failed login. The requests go
-- round-robin over several accounts, each from its own client address in X-Forwarded-For (the
-- server is started with TRUSTED_PROXIES=127.0.0.1): the server takes a throttle slot per email
-- (10 a minute) and per client address (30 a minute) before it checks the password, gives it
-- back on success, and keeps it when the client goes away mid-request, as wrk's connections
-- do at the end of a run. From 127.0.0.1 alone, or with one account, the flood would soon be
-- answered 429 instead of being hashed.
-- Environment: BENCH_USERNAMES (comma-separated emails), BENCH_FORWARDED_FOR (as many
-- comma-separated addresses; header text only, nothing is sent there), BENCH_PASSWORD
-- (required); BENCH_STATUS=1 also counts responses by status code.
local usernames = os.getenv("BENCH_USERNAMES")
local password = os.getenv("BENCH_PASSWORD")
if usernames == nil or usernames == "" or password == nil or password == "" then
  error("BENCH_USERNAMES and BENCH_PASSWORD must be set")
end
local function form_escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"

local bodies = {}
for username in string.gmatch(usernames, "[^,]+") do
  table.insert(bodies, "grant_type=password&username=" .. form_escape(username)
    .. "&password=" .. form_escape(password))
end
local addresses = {}
for address in string.gmatch(os.getenv("BENCH_FORWARDED_FOR") or "", "[^,]+") do
  table.insert(addresses, address)
end
if #addresses ~= #bodies then
  error("BENCH_FORWARDED_FOR must hold one address per username")
end
local next_body = 0

function request()
  next_body = next_body % #bodies + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do
    headers[name] = value
  end
  headers["X-Forwarded-For"] = addresses[next_body]
  return wrk.format(nil, nil, headers, bodies[next_body])
end

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/status_counter.lua")
