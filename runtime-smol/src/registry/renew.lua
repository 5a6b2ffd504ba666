local prefix = ARGV[1] .. ' '
for _, key in ipairs(KEYS) do
    local value = redis.call('GET', key)
    if value and string.sub(value, 1, #prefix) == prefix then
        redis.call('PEXPIRE', key, ARGV[2])
    end
end
return 0
