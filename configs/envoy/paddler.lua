-- paddler.lua: the Envoy side of llama.cpp-aware balancing (Envoy 1.40, LuaJIT = Lua 5.1).
--
-- Slot-aware routing through paddler-agent's endpoint picker. Per request: drop any
-- client-supplied routing header, forward only what the route's allow-list names (the request
-- reduced to "METHOD:path" as llama-server will route it: 403 for /slots and admin endpoints
-- not exposed, 404 for anything else), then ask the agent's picker where to go:
--   200 -> set x-paddler-endpoint (the chosen server, then alternates for a retry after a refused
--          connection); the cluster's override_host policy routes there;
--   503 with x-paddler-verdict -> answer the client with the agent's JSON (buffer full or timeout);
--   403 or 421 (the agent refused the filter's picker_token or name) -> no header, an error:
--       least_request, as when the agent is down (a config slip must not become an outage);
--   anything else (agent down) -> no header, a warning: the cluster falls back to least_request.
-- When the response has streamed to its end, the lease is released so the slot is reused at once.
-- When the server the picker chose refused the connection (Envoy retried it elsewhere, or gave up), the
-- filter tells the picker as soon as the response starts, so nothing more is placed there.
--
-- Settings come from the route's metadata (filter_metadata "envoy.filters.http.lua");
-- paddler-gen envoy writes them:
--   picker_token (sent to the agent in x-paddler-picker-token), picker_timeout_ms,
--       routes (route key -> forward, slots or admin), slots_forbidden_body,
--       admin_forbidden_body, not_exposed_body   required: a route without one is answered
--       500 "misconfigured" and logged, never guessed;
--   skip_picker                  optional: true on routes that are not llama.cpp (/health).
--
-- Envoy config lines (paddler-gen envoy writes them):
--   http_filters:
--   - name: envoy.filters.http.lua
--     typed_config:
--       "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
--       default_source_code: {filename: /etc/envoy/paddler/paddler.lua}
--   clusters: paddler_agent (the agent's management address) and llama (override_host on
--   the x-paddler-endpoint header, least_request fallback).
--
-- Everything is local; the file returns its table of pure helpers (for the unit tests, run on
-- a plain LuaJIT) and defines the two globals Envoy looks up: envoy_on_request, envoy_on_response.

local paddler = {}

local ENDPOINT_HEADER = "x-paddler-endpoint"
local VERDICT_HEADER = "x-paddler-verdict"
local LEASE_HEADER = "x-paddler-lease"
local UPSTREAM_HEADER = "x-paddler-upstream"  -- added by the llama routes, for this filter only
local AGENT_CLUSTER = "paddler_agent"
local AGENT_AUTHORITY = "paddler-agent"  -- a host name the agent serves (agentcheck/management.py)
local PICKER_TOKEN_HEADER = "x-paddler-picker-token"
local RELEASE_TIMEOUT_MS = 1000
local REQUIRED_SETTINGS = { "picker_timeout_ms", "routes", "slots_forbidden_body", "admin_forbidden_body",
                            "not_exposed_body", "picker_token" }

-- UTF-8 bytes of a code point below 0x10000; like cpp-httplib, nothing for a lone surrogate.
local function utf8_bytes(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 + math.floor(code / 64), 0x80 + code % 64)
  elseif code >= 0xD800 and code < 0xE000 then
    return ""
  end
  return string.char(0xE0 + math.floor(code / 4096), 0x80 + math.floor(code / 64) % 64, 0x80 + code % 64)
end

-- The path llama-server routes on (cpp-httplib): the target cut at '#', then at '?', then %XX
-- and %uXXXX decoded once, left to right; a '%' not followed by a valid escape stays as it is.
-- The same function as in the HAProxy bridge; both are tested against fleet/contract.py.
function paddler.llama_server_path(target)
  local path = string.match(string.match(target or "", "^[^#]*"), "^[^?]*")
  if not string.find(path, "%", 1, true) then
    return path
  end
  local out, i, n = {}, 1, #path
  while i <= n do
    local char = string.sub(path, i, i)
    local unicode = char == "%" and string.match(path, "^u(%x%x%x%x)", i + 1)
    local byte = char == "%" and not unicode and string.sub(path, i + 1, i + 1) ~= "u"
                 and string.match(path, "^(%x%x)", i + 1)
    if unicode then
      out[#out + 1] = utf8_bytes(tonumber(unicode, 16))
      i = i + 6
    elseif byte then
      out[#out + 1] = string.char(tonumber(byte, 16))
      i = i + 3
    else
      out[#out + 1] = char
      i = i + 1
    end
  end
  return table.concat(out)
end

-- "METHOD:path" as llama-server will route the request: HEAD is GET there, and any one
-- segment after /slots/ is a slot id.
function paddler.route_key(method, target)
  local path = paddler.llama_server_path(target)
  if string.match(path, "^/slots/[^/]+$") then
    path = "/slots/{id}"
  end
  if method == "HEAD" then
    method = "GET"
  end
  return tostring(method) .. ":" .. path
end

-- The route's settings as a table, or nil and the reason (naming the key) when one is missing.
-- metadata is anything with get(self, key): Envoy's route metadata handle.
function paddler.read_settings(metadata)
  local settings = {}
  for _, key in ipairs(REQUIRED_SETTINGS) do
    local value = metadata:get(key)
    if value == nil then
      return nil, "route metadata lacks " .. key
    end
    settings[key] = value
  end
  settings.picker_timeout_ms = tonumber(settings.picker_timeout_ms)
  if settings.picker_timeout_ms == nil or settings.picker_timeout_ms <= 0 then
    return nil, "route metadata's picker_timeout_ms is not a positive number"
  end
  if type(settings.routes) ~= "table" then
    return nil, "route metadata's routes is not a table"
  end
  return settings
end

-- The 500 body for a route paddler-gen did not write; same shape as llama.cpp's errors.
-- reason comes from read_settings: fixed text and key names, nothing to escape.
function paddler.misconfigured_body(reason)
  return '{"error":{"code":500,"type":"misconfigured","message":"paddler.lua: ' .. reason .. '"}}'
end

-- The status and body of the refusal when this request must not reach llama.cpp, else nil.
function paddler.refusal(path, method, settings)
  local verdict = settings.routes[paddler.route_key(method, path)]
  if verdict == "forward" then
    return nil
  elseif verdict == "slots" then
    return "403", settings.slots_forbidden_body
  elseif verdict == "admin" then
    return "403", settings.admin_forbidden_body
  end
  return "404", settings.not_exposed_body
end

-- The headers of a call to the agent's picker; token is the route's picker_token.
function paddler.agent_headers(path, token)
  return { [":method"] = "POST", [":path"] = path, [":authority"] = AGENT_AUTHORITY, ["content-length"] = "0",
           [PICKER_TOKEN_HEADER] = token }
end

-- What the route's x-paddler-upstream ("host attempts flags details", Envoy's own words) says about the
-- server the picker chose: true when it refused the connection or dropped it before answering, then the
-- address of the server Envoy's retry got an answer from, if any. Envoy tries again only after a failed
-- connection (retry_on: connect-failure), so a second attempt means the first server refused.
function paddler.placement_failure(upstream)
  local host, attempts, flags, details = string.match(upstream or "", "^(%S+) (%d+) (%S+) (%S+)$")
  if host == nil then
    return false
  end
  local answered = details == "via_upstream"
  if tonumber(attempts) > 1 then
    return true, answered and host or nil
  end
  flags = "," .. flags .. ","
  return not answered and (string.find(flags, ",UF,", 1, true) ~= nil or string.find(flags, ",UC,", 1, true) ~= nil)
end

function paddler.on_request(request_handle)
  local headers = request_handle:headers()
  headers:remove(ENDPOINT_HEADER)
  local metadata = request_handle:metadata()
  if metadata:get("skip_picker") then
    return
  end
  local settings, problem = paddler.read_settings(metadata)
  if settings == nil then
    request_handle:logErr("paddler.lua: " .. problem)
    request_handle:respond({ [":status"] = "500", ["content-type"] = "application/json" },
                           paddler.misconfigured_body(problem))
    return
  end
  local refused, body = paddler.refusal(headers:get(":path"), headers:get(":method"), settings)
  if refused ~= nil then
    request_handle:respond({ [":status"] = refused, ["content-type"] = "application/json" }, body)
    return
  end

  local acquire = paddler.agent_headers("/api/v1/picker/acquire", settings.picker_token)
  local reply_headers, reply_body = request_handle:httpCall(AGENT_CLUSTER, acquire, "", settings.picker_timeout_ms)
  local status = reply_headers[":status"]
  if status == "200" and reply_headers[ENDPOINT_HEADER] ~= nil then
    -- Header handles do not survive the yield inside httpCall: fetch them again.
    request_handle:headers():add(ENDPOINT_HEADER, reply_headers[ENDPOINT_HEADER])
    if reply_headers[LEASE_HEADER] ~= nil then
      request_handle:streamInfo():dynamicMetadata():set("paddler", "lease", reply_headers[LEASE_HEADER])
    end
  elseif status == "503" and reply_headers[VERDICT_HEADER] ~= nil then
    request_handle:respond({ [":status"] = "503", ["content-type"] = "application/json",
                             ["retry-after"] = reply_headers["retry-after"] or "1" }, reply_body)
  elseif status == "403" or status == "421" then
    request_handle:logErr("paddler-agent refused the filter's call (status " .. status .. "): paddler-gen envoy " ..
                          "and paddler-agent must read the same agent.picker_token_env; falling back to least_request")
  else
    request_handle:logWarn("paddler-agent picker unavailable (status " .. tostring(status) ..
                           "): falling back to least_request")
  end
end

function paddler.on_response(response_handle)
  local headers = response_handle:headers()
  local upstream = headers:get(UPSTREAM_HEADER)
  headers:remove(UPSTREAM_HEADER)
  local state = response_handle:streamInfo():dynamicMetadata():get("paddler")
  if state == nil or state["lease"] == nil then
    return
  end
  -- The token from the route's metadata, like on the request: the secret stays out of dynamic metadata.
  local token = response_handle:metadata():get("picker_token")
  local failed, served_by = paddler.placement_failure(upstream)
  if failed then
    local report = paddler.agent_headers("/api/v1/picker/failed/" .. state["lease"], token)
    report[ENDPOINT_HEADER] = served_by
    response_handle:httpCall(AGENT_CLUSTER, report, "", RELEASE_TIMEOUT_MS, true)
  end
  -- Iterating passes each chunk on unbuffered; the loop ends when the (streamed) response does.
  for _ in response_handle:bodyChunks() do
  end
  local release = paddler.agent_headers("/api/v1/picker/release/" .. state["lease"], token)
  response_handle:httpCall(AGENT_CLUSTER, release, "", RELEASE_TIMEOUT_MS, true)
end

-- Envoy finds its entry points as globals.
envoy_on_request = paddler.on_request
envoy_on_response = paddler.on_response

return paddler
