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
-- When the response has streamed to its end, the lease is released so the slot is reused at once, before
-- the end reaches the client: a client's next request (a conversation's next turn) finds the slot free.
-- When the server the picker chose refused the connection (Envoy retried it elsewhere, or gave up), the
-- filter tells the picker as soon as the response starts, so nothing more is placed there.
--
-- Settings come from the route's metadata (filter_metadata "envoy.filters.http.lua");
-- paddler-gen envoy writes them:
--   picker_token (sent to the agent in x-paddler-picker-token), picker_timeout_ms,
--       routes (route key -> forward, slots or admin), slots_forbidden_body,
--       admin_forbidden_body, not_exposed_body   required: a route without one is answered
--       500 "misconfigured" and logged, never guessed;
--   skip_picker                  optional: true on routes that are not llama.cpp (/health);
--   models                       in a fleet that routes by model: model name -> true. Then also required:
--       model_routes (route keys whose JSON body names a model), max_request_body, models_list_body and the
--       answers model_not_found_body (404), body_not_json_body and model_missing_body (400),
--       body_too_large_body (413), agent_unavailable_body (503); optional: default_model, where a request
--       that names no model goes (and those on other routes: GET /props, OPTIONS, audio; without it, any server).
--
-- Routing by model: the filter reads the body of a model route (at most max_request_body: 413 beyond, from
-- content-length when sent, else from what arrived), answers 400/404/413 itself, and asks the picker for a
-- server of that model (x-paddler-model). GET /v1/models and /models get the fleet's models from the filter.
-- Without the agent there is no fallback: least_request would ignore the model, so the client gets 503.
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

local bit = require("bit")

local ENDPOINT_HEADER = "x-paddler-endpoint"
local AFFINITY_HEADER = "x-paddler-affinity"
local VERDICT_HEADER = "x-paddler-verdict"
local LEASE_HEADER = "x-paddler-lease"
local UPSTREAM_HEADER = "x-paddler-upstream"  -- added by the llama routes, for this filter only
local AGENT_CLUSTER = "paddler_agent"
local AGENT_AUTHORITY = "paddler-agent"  -- a host name the agent serves (agentcheck/management.py)
local PICKER_TOKEN_HEADER = "x-paddler-picker-token"
local RELEASE_TIMEOUT_MS = 1000
local MODEL_HEADER = "x-paddler-model"  -- the model the picker must place the request on
local REQUIRED_SETTINGS = { "picker_timeout_ms", "routes", "slots_forbidden_body", "admin_forbidden_body",
                            "not_exposed_body", "picker_token" }
-- Required too when the route has "models" (a fleet that routes by model); default_model is optional.
local MODEL_SETTINGS = { "model_routes", "max_request_body", "models_list_body", "model_not_found_body",
                         "body_not_json_body", "model_missing_body", "body_too_large_body", "agent_unavailable_body" }
-- Required when the route has "affinity" only (one model): the routes whose body is read, and its bound.
local BODY_SETTINGS = { "model_routes", "max_request_body" }
local MODEL_LISTINGS = { ["GET:/v1/models"] = true, ["GET:/models"] = true }  -- answered by the filter

-- UTF-8 bytes of a code point; like cpp-httplib, nothing for a lone surrogate.
local function utf8_bytes(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 + math.floor(code / 64), 0x80 + code % 64)
  elseif code >= 0xD800 and code < 0xE000 then
    return ""
  elseif code < 0x10000 then
    return string.char(0xE0 + math.floor(code / 4096), 0x80 + math.floor(code / 64) % 64, 0x80 + code % 64)
  end
  return string.char(0xF0 + math.floor(code / 262144), 0x80 + math.floor(code / 4096) % 64,
                     0x80 + math.floor(code / 64) % 64, 0x80 + code % 64)
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

-- Copies each of keys from the route's metadata into settings; the reason when one is missing.
local function copy_settings(metadata, keys, settings)
  for _, key in ipairs(keys) do
    local value = metadata:get(key)
    if value == nil then
      return "route metadata lacks " .. key
    end
    settings[key] = value
  end
end

-- The route's settings as a table, or nil and the reason (naming the key) when one is missing.
-- metadata is anything with get(self, key): Envoy's route metadata handle.
function paddler.read_settings(metadata)
  local settings = {}
  local missing = copy_settings(metadata, REQUIRED_SETTINGS, settings)
  if missing ~= nil then
    return nil, missing
  end
  settings.picker_timeout_ms = tonumber(settings.picker_timeout_ms)
  if settings.picker_timeout_ms == nil or settings.picker_timeout_ms <= 0 then
    return nil, "route metadata's picker_timeout_ms is not a positive number"
  end
  if type(settings.routes) ~= "table" then
    return nil, "route metadata's routes is not a table"
  end
  settings.models = metadata:get("models")
  settings.affinity = metadata:get("affinity") == true
  if settings.models == nil and not settings.affinity then
    return settings
  end
  missing = copy_settings(metadata, settings.models ~= nil and MODEL_SETTINGS or BODY_SETTINGS, settings)
  if missing ~= nil then
    return nil, missing
  end
  settings.default_model = metadata:get("default_model")
  settings.max_request_body = tonumber(settings.max_request_body)
  if settings.max_request_body == nil or settings.max_request_body <= 0 then
    return nil, "route metadata's max_request_body is not a positive number"
  end
  if (settings.models ~= nil and type(settings.models) ~= "table") or type(settings.model_routes) ~= "table" then
    return nil, "route metadata's models or model_routes is not a table"
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

-- Model-aware routing. The model a request names, read the way llama-server's JSON parser reads the body
-- (fleet/contract.py's request_model is the reference; the HAProxy bridge has the same scanner in Lua 5.3,
-- whose comment says how it reads). Returns "model", name | "absent" (none, or null) | "malformed".
local MAX_JSON_DEPTH = 128
local MAX_TOP_LEVEL_MEMBERS = 256
local MAX_MODEL_KEY_TEXT = 2 + 5 * 6  -- "model" with each letter escaped (\u006d...), and its quotes
local MAX_MODEL_TEXT = 2 + 128 * 12  -- the longest model name, every character escaped, and its quotes
-- Affinity (as in the HAProxy bridge): the top-level strings that name a conversation, the messages counted
-- per request, and how much of a completion's prompt tells its conversation apart.
local DECODED_FIELDS = { prompt_cache_key = true, user = true }
local MAX_CONVERSATION_MESSAGES = 4096
local PROMPT_LEAD_BYTES = 256
local JSON_ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function skip_space(body, i)
  return select(2, string.find(body, "^[ \t\n\r]*", i)) + 1
end

-- The length of the well-formed UTF-8 sequence whose lead byte is at j, or nil: what nlohmann::json accepts
-- (no overlong form, no surrogate, nothing above U+10FFFF). LuaJIT has no utf8 library: the ranges are
-- Unicode's table of well-formed byte sequences.
local function utf8_length(body, j)
  local lead = string.byte(body, j)
  local count, low, high
  if lead >= 0xC2 and lead <= 0xDF then
    count, low, high = 1, 0x80, 0xBF
  elseif lead == 0xE0 then
    count, low, high = 2, 0xA0, 0xBF
  elseif lead == 0xED then
    count, low, high = 2, 0x80, 0x9F
  elseif lead >= 0xE1 and lead <= 0xEF then
    count, low, high = 2, 0x80, 0xBF
  elseif lead == 0xF0 then
    count, low, high = 3, 0x90, 0xBF
  elseif lead >= 0xF1 and lead <= 0xF3 then
    count, low, high = 3, 0x80, 0xBF
  elseif lead == 0xF4 then
    count, low, high = 3, 0x80, 0x8F
  else
    return nil
  end
  local second = string.byte(body, j + 1)
  if second == nil or second < low or second > high then
    return nil
  end
  for k = j + 2, j + count do
    local byte = string.byte(body, k)
    if byte == nil or byte < 0x80 or byte > 0xBF then
      return nil
    end
  end
  return count + 1
end

-- The string whose opening quote is at i: the index after its closing quote, and its text when decode is
-- true; nil when it is not a valid JSON string.
local function scan_string(body, i, decode)
  local parts, pos = decode and {} or nil, i + 1
  while true do
    local j = string.find(body, '[%z\1-\31"\\\128-\255]', pos)
    if j == nil then
      return nil
    end
    local byte = string.byte(body, j)
    if byte < 32 then
      return nil
    elseif byte >= 128 then
      local length = utf8_length(body, j)
      if length == nil then
        return nil
      end
      if decode then
        parts[#parts + 1] = string.sub(body, pos, j + length - 1)
      end
      pos = j + length
    else
      if decode and j > pos then
        parts[#parts + 1] = string.sub(body, pos, j - 1)
      end
      if byte == 34 then
        return j + 1, decode and table.concat(parts) or nil
      end
      local escape = string.sub(body, j + 1, j + 1)
      if escape == "u" then
        local code = tonumber(string.match(body, "^%x%x%x%x", j + 2) or "", 16)
        pos = j + 6
        if code == nil or (code >= 0xDC00 and code < 0xE000) then
          return nil
        elseif code >= 0xD800 and code < 0xDC00 then
          local low = tonumber(string.match(body, "^\\u(%x%x%x%x)", pos) or "", 16)
          if low == nil or low < 0xDC00 or low >= 0xE000 then
            return nil
          end
          code, pos = 0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00), pos + 6
        end
        if decode then
          parts[#parts + 1] = utf8_bytes(code)
        end
      elseif JSON_ESCAPES[escape] then
        if decode then
          parts[#parts + 1] = JSON_ESCAPES[escape]
        end
        pos = j + 2
      else
        return nil
      end
    end
  end
end

-- The string whose opening quote is at i, not decoded: the index after its closing quote (the first
-- quote after an even number of backslashes), or nil.
local function skip_string(body, i)
  local pos = i + 1
  while true do
    local quote = string.find(body, '"', pos, true)
    if quote == nil then
      return nil
    end
    local before = quote - 1
    while string.byte(body, before) == 92 do
      before = before - 1
    end
    if (quote - 1 - before) % 2 == 0 then
      return quote + 1
    end
    pos = quote + 1
  end
end

-- The number at i: the index after it, or nil.
local function scan_number(body, i)
  local j = string.sub(body, i, i) == "-" and i + 1 or i
  local whole = string.match(body, "^0", j) or string.match(body, "^[1-9]%d*", j)
  if whole == nil then
    return nil
  end
  j = j + #whole
  local fraction = string.match(body, "^%.%d+", j)
  if fraction then
    j = j + #fraction
  elseif string.sub(body, j, j) == "." then
    return nil
  end
  local exponent = string.match(body, "^[eE][-+]?%d+", j)
  if exponent then
    return j + #exponent
  end
  return not string.match(body, "^[eE]", j) and j or nil
end

local JSON_LITERALS = { t = "true", f = "false", n = "null" }

-- One scalar at i (string, number, literal): the index after it, and its kind and text ("string", text),
-- ("null"), ("other"); nil when invalid.
local function scan_scalar(body, i, decode)
  local char = string.sub(body, i, i)
  if char == '"' then
    if not decode then
      return skip_string(body, i), "string"
    end
    local after, text = scan_string(body, i, true)
    return after, "string", text
  end
  local literal = JSON_LITERALS[char]
  if literal then
    if string.sub(body, i, i + #literal - 1) ~= literal then
      return nil
    end
    return i + #literal, literal == "null" and "null" or "other"
  end
  return scan_number(body, i), "other"
end

local STRUCTURAL = { "[", "]", "{", "}", '"' }

-- The array or object whose opening bracket is at i (at nesting depth `depth`), not read: the index after
-- its closing bracket, or nil when it does not close, closes with the wrong bracket, or nests deeper than
-- MAX_JSON_DEPTH. It jumps from one bracket or quote to the next with plain searches (memchr), each kind's
-- next position kept until passed, so its cost is the number of brackets and strings, not of characters.
local function skip_container(body, i, depth)
  local stack, pos, next_at = { string.sub(body, i, i) }, i + 1, {}
  while true do
    local at, char
    for _, kind in ipairs(STRUCTURAL) do
      local found = next_at[kind]
      if found ~= false and (found == nil or found < pos) then
        found = string.find(body, kind, pos, true) or false
        next_at[kind] = found
      end
      if found and (at == nil or found < at) then
        at, char = found, kind
      end
    end
    if at == nil then
      return nil
    elseif char == '"' then
      pos = skip_string(body, at)
      if pos == nil then
        return nil
      end
    elseif char == "[" or char == "{" then
      if depth + #stack >= MAX_JSON_DEPTH then
        return nil
      end
      stack[#stack + 1], pos = char, at + 1
    elseif stack[#stack] ~= (char == "]" and "[" or "{") then
      return nil
    else
      stack[#stack], pos = nil, at + 1
      if #stack == 0 then
        return pos
      end
    end
  end
end

-- A top-level member's value at i: the index after it, and ("string", text) | ("null") | ("other"); the text
-- only for the model (decode), and not for one longer than any model name: that one reads as "".
local function scan_value(body, i, decode)
  local char = string.sub(body, i, i)
  if char == "{" or char == "[" then
    return skip_container(body, i, 1), "other"
  elseif decode and char == '"' then
    local after = skip_string(body, i)
    if after ~= nil and after - i > MAX_MODEL_TEXT then
      return after, "string", ""
    end
  end
  return scan_scalar(body, i, decode)
end

-- The elements of the array at start: the index after each (at most MAX_CONVERSATION_MESSAGES), skipped
-- as the scanner skips nested values; what affinity keys a conversation by (see paddler.affinity_keys).
local function element_ends(body, start)
  local ends, i = {}, skip_space(body, start + 1)
  while string.sub(body, i, i) ~= "]" and #ends < MAX_CONVERSATION_MESSAGES do
    local char, after = string.sub(body, i, i), nil
    if char == "{" or char == "[" then
      after = skip_container(body, i, 2)
    else
      after = scan_scalar(body, i, false)
    end
    if after == nil then
      return ends
    end
    ends[#ends + 1] = after
    i = skip_space(body, after)
    if string.sub(body, i, i) == "," then
      i = skip_space(body, i + 1)
    end
  end
  return ends
end

-- Returns the verdict and model (see above), and, for prompt-cache affinity, what the body says about its
-- conversation: { prompt_cache_key =, user = } (short strings), and the messages array (messages_start,
-- message_ends) or the prompt string (prompt_start, prompt_end); of repeated keys the last, as for model.
function paddler.request_model(body)
  local i = skip_space(body, 1)
  if string.sub(body, i, i) ~= "{" then
    return "malformed"
  end
  i = skip_space(body, i + 1)
  local verdict, model, members, fields = "absent", nil, 0, {}
  local closing = string.sub(body, i, i) == "}"
  while not closing do
    members = members + 1
    if members > MAX_TOP_LEVEL_MEMBERS or string.sub(body, i, i) ~= '"' then
      return "malformed"
    end
    -- A key longer than "model" written with every letter escaped cannot be "model": not decoded.
    local after, key = skip_string(body, i), nil
    if after ~= nil and after - i <= MAX_MODEL_KEY_TEXT then
      after, key = scan_string(body, i, true)
    end
    if after == nil then
      return "malformed"
    end
    i = skip_space(body, after)
    if string.sub(body, i, i) ~= ":" then
      return "malformed"
    end
    local start, kind, text = skip_space(body, i + 1), nil, nil
    after, kind, text = scan_value(body, start, key == "model" or DECODED_FIELDS[key])
    if after == nil then
      return "malformed"
    end
    if key == "model" then
      if kind == "string" then
        verdict, model = "model", text
      elseif kind == "null" then
        verdict, model = "absent", nil
      else
        verdict, model = "malformed", nil
      end
    elseif DECODED_FIELDS[key] then
      fields[key] = kind == "string" and text ~= "" and text or nil
    elseif key == "messages" then
      fields.messages_start = string.sub(body, start, start) == "[" and start or nil
      fields.message_ends = fields.messages_start and element_ends(body, start)
    elseif key == "prompt" then
      fields.prompt_start, fields.prompt_end = kind == "string" and start or nil, after
    end
    i = skip_space(body, after)
    local char = string.sub(body, i, i)
    closing = char == "}"
    if not closing and char ~= "," then
      return "malformed"
    end
    i = closing and i or skip_space(body, i + 1)
  end
  if skip_space(body, i + 1) <= #body then
    return "malformed"
  end
  return verdict, model, fields
end

-- Prompt-cache affinity: what a request's conversation is known by, in order (docs/affinity.md):
-- OpenAI's prompt_cache_key, the X-Session-Id header, the user field, else the conversation itself.
-- Returns the keys the server that serves it is remembered under, and the keys to look up, best first.
-- A chat is known by its messages: a follow-up turn repeats the previous request's messages and adds the
-- answer and a new question, so it looks up its messages but the last two (the previous turn), then all
-- but the last, then all; it is remembered under all its messages. Never under its first message alone:
-- a system prompt many conversations share is in every server's cache soon, and keying new conversations
-- by it would send them all to one server. A completion is known by its prompt's first PROMPT_LEAD_BYTES
-- bytes.
function paddler.affinity_keys(body, fields, session)
  local named = (fields.prompt_cache_key and "k:" .. fields.prompt_cache_key)
                or (session and session ~= "" and "s:" .. session) or (fields.user and "u:" .. fields.user)
  if named then
    return { named }, { named }
  end
  local ends = fields.message_ends
  if ends and #ends > 0 then
    local start = fields.messages_start
    local function upto(count)
      return "m:" .. string.sub(body, start, ends[count] - 1)
    end
    local lookups = {}
    for _, count in ipairs({ #ends - 2, #ends - 1, #ends }) do
      if count >= 2 or count == #ends then
        lookups[#lookups + 1] = upto(count)
      end
    end
    return { upto(#ends) }, lookups
  end
  if fields.prompt_start then
    local lead = "p:" .. string.sub(body, fields.prompt_start, math.min(fields.prompt_end - 1,
                                                                       fields.prompt_start + PROMPT_LEAD_BYTES - 1))
    return { lead }, { lead }
  end
  return {}, {}
end

-- FNV-1a over a string, twice from different offsets: 64 bits as 16 hex digits (LuaJIT has no hash library;
-- the multiplication by the FNV prime, 2^24 + 403, is split so that every step stays exact in a double).
function paddler.digest(text)
  local first, second = 0x811c9dc5, 0x050c5d1f
  for i = 1, #text do
    local byte = string.byte(text, i)
    first = bit.bxor(first, byte)
    first = bit.tobit(bit.lshift(first, 24) + first * 403)
    second = bit.bxor(second, byte)
    second = bit.tobit(bit.lshift(second, 24) + second * 403)
  end
  return bit.tohex(first) .. bit.tohex(second)
end

-- What the picker is told about a request's conversation (x-paddler-affinity): "r=<keys>;l=<keys>", the
-- digests it is remembered under and those to look up, best first (affinity_keys); nil when it has none.
function paddler.affinity_header(body, fields, session)
  local remember, lookups = paddler.affinity_keys(body, fields, session)
  if #lookups == 0 then
    return nil
  end
  local digests = {}
  local function hashed(keys)
    local out = {}
    for index, key in ipairs(keys) do
      digests[key] = digests[key] or paddler.digest(key)
      out[index] = digests[key]
    end
    return table.concat(out, ",")
  end
  return "r=" .. hashed(remember) .. ";l=" .. hashed(lookups)
end

-- In a fleet that routes by model: the model a request goes to (nil: any server), or nil and the status and
-- body of the balancer's own answer. key is the route key; body the request's body on model routes.
function paddler.choose_model(key, body, settings)
  if MODEL_LISTINGS[key] then
    return nil, "200", settings.models_list_body
  elseif not settings.model_routes[key] then
    return settings.default_model
  end
  local verdict, name, fields = paddler.request_model(body)
  if verdict == "malformed" then
    return nil, "400", settings.body_not_json_body
  elseif verdict == "absent" then
    if settings.default_model == nil then
      return nil, "400", settings.model_missing_body
    end
    return settings.default_model, nil, nil, fields
  elseif settings.models[name] ~= true then
    return nil, "404", settings.model_not_found_body
  end
  return name, nil, nil, fields
end

-- The body of a model route as text, or nil when it is larger than max_request_body: refused from its
-- content-length before anything is read, else from what Envoy buffered (chunked uploads). Yields.
local function bounded_body(request_handle, content_length, limit)
  if (tonumber(content_length or "") or 0) > limit then
    return nil
  end
  local buffered = request_handle:body()
  if buffered == nil then
    return ""
  elseif buffered:length() > limit then
    return nil
  end
  return buffered:getBytes(0, buffered:length())
end

-- The picker could not be asked (agent away, or it refused the filter). One model: least_request serves.
-- Several: a plain llama-server ignores "model", so least_request could answer with the wrong one: 503.
local function picker_unavailable(request_handle, settings, status)
  local refused = status == "403" or status == "421"
  local log = refused and request_handle.logErr or request_handle.logWarn
  local what = refused and "paddler-agent refused the filter's call (status " .. status .. "): paddler-gen envoy " ..
               "and paddler-agent must read the same agent.picker_token_env; "
               or "paddler-agent picker unavailable (status " .. tostring(status) .. "): "
  if settings.models == nil then
    log(request_handle, what .. "falling back to least_request")
    return
  end
  log(request_handle, what .. "this fleet routes by model, so no fallback: answering 503")
  request_handle:respond({ [":status"] = "503", ["content-type"] = "application/json", ["retry-after"] = "1" },
                         settings.agent_unavailable_body)
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
  local key = paddler.route_key(headers:get(":method"), headers:get(":path"))
  local session = headers:get("x-session-id")
  local text, fields = "", nil
  if (settings.models ~= nil or settings.affinity) and settings.model_routes[key] then
    -- Reading the body yields: header handles taken before it are not used after it.
    text = bounded_body(request_handle, headers:get("content-length"), settings.max_request_body)
    if text == nil and settings.models ~= nil then
      request_handle:respond({ [":status"] = "413", ["content-type"] = "application/json" },
                             settings.body_too_large_body)
      return
    end
  end
  if settings.models ~= nil then
    local model, status, answer
    model, status, answer, fields = paddler.choose_model(key, text, settings)
    if status ~= nil then
      request_handle:respond({ [":status"] = status, ["content-type"] = "application/json" }, answer)
      return
    end
    acquire[MODEL_HEADER] = model
  elseif text ~= nil and text ~= "" then
    fields = select(3, paddler.request_model(text))
  end
  if settings.affinity and fields ~= nil then
    acquire[AFFINITY_HEADER] = paddler.affinity_header(text, fields, session)
  end
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
  else
    picker_unavailable(request_handle, settings, status)
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
  -- Synchronous: Envoy holds the response's end while the call runs (the filter's onData answers
  -- StopIteration during an httpCall), so the slot is free before the client can send its next request.
  local release = paddler.agent_headers("/api/v1/picker/release/" .. state["lease"], token)
  response_handle:httpCall(AGENT_CLUSTER, release, "", RELEASE_TIMEOUT_MS)
end

-- Envoy finds its entry points as globals.
envoy_on_request = paddler.on_request
envoy_on_response = paddler.on_response

return paddler
