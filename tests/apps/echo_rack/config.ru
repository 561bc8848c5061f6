# frozen_string_literal: true

# Echoes the Rack env and the request body as JSON; tests compare it.
#
# Paths starting with /app/ exercise the server's side of the Rack SPEC (streaming, to_path,
# close, errors, crashes), like apps/wsgi_echo does for WSGI. Under /lint the echo runs behind
# Rack::Lint, which checks the env and the input stream the server hands over.

require "digest"
require "json"

CLOSE_MARKER = ENV["ECHO_CLOSE_MARKER"]
puts "echo app loaded"

# A body whose close the server must call.
class Closing
  def initialize(parts, fail: false)
    @parts = parts
    @fail = fail
  end

  def each(&block)
    raise "iteration failed" if @fail

    @parts.each(&block)
  end

  def close
    File.write(CLOSE_MARKER, "closed\n", mode: "a") if CLOSE_MARKER
  end
end

# A body of unknown length, yielded piece by piece; an empty piece must not end a chunked body.
class Lines
  def initialize(parts, delay: 0, raise_after: nil)
    @parts = parts
    @delay = delay
    @raise_after = raise_after
  end

  def each
    @parts.each_with_index do |part, i|
      raise "raised after the response began" if @raise_after == i

      sleep @delay if @delay.positive?
      yield part
    end
  end
end

# A Rack 3 streaming body: it responds to call, not each.
class Streaming
  def call(stream)
    stream.write("streamed ")
    stream << "by call"
  ensure
    stream.close
  end
end

# A body that is a file, sent by path when the server can.
class FileBody
  def initialize(path)
    @path = path
  end

  def to_path
    @path
  end

  def each
    File.open(@path, "rb") { |f| while (block = f.read(16_384)) do yield block end }
  end
end

module EchoRack
  module_function

  def text(body, status = 200, headers = {})
    [status, { "Content-Type" => "text/plain" }.merge(headers), [body]]
  end

  def call(env)
    return conformance(env) if env["PATH_INFO"] == "/conformance"

    route = ROUTES[env["PATH_INFO"]]
    return route.call(env) if route

    echo(env)
  end

  # The answer every language's echo app gives at /conformance, for the shared suite.
  def conformance(env)
    body = env["rack.input"].read
    headers = {}
    env.each do |key, value|
      headers[key[5..].downcase.tr("_", "-")] = latin1(value) if key.start_with?("HTTP_")
    end
    %w[CONTENT_TYPE CONTENT_LENGTH].each do |key|
      headers[key.downcase.tr("_", "-")] = env[key] if env[key] && !env[key].empty?
    end
    out = JSON.generate(
      "method" => env["REQUEST_METHOD"], "path" => env["PATH_INFO"],
      "query" => env["QUERY_STRING"], "headers" => headers,
      "body_len" => body.bytesize, "body_sha256" => Digest::SHA256.hexdigest(body)
    )
    [200, { "Content-Type" => "application/json", "Content-Length" => out.bytesize.to_s }, [out]]
  end

  # The request body, read the way the X-Read header asks, and what a read after it gives.
  def read_body(input, how)
    pieces =
      case how
      when "read-n"
        Array.new.tap { |a| while (chunk = input.read(1000)) do a << chunk end }
      when "read-buffer"
        buffer = +""
        Array.new.tap { |a| while input.read(1000, buffer) do a << buffer.dup end }
      when "gets"
        Array.new.tap { |a| while (line = input.gets) do a << line end }
      when "each"
        Array.new.tap { |a| input.each { |line| a << line } }
      else
        [input.read]
      end
    after = input.read
    input.rewind
    [pieces, after, input.read]
  end

  def latin1(value)
    value.dup.force_encoding(Encoding::ISO_8859_1).encode(Encoding::UTF_8)
  end

  def echo(env)
    pieces, after, reread = read_body(env["rack.input"], env["HTTP_X_READ"])
    body = pieces.join
    data = {}
    env.each do |key, value|
      case value
      when String then data[key] = latin1(value)
      when Integer, true, false, nil then data[key] = value
      end
    end
    data["rack.version"] = env["rack.version"]
    data["rack.errors_is_stderr"] = env["rack.errors"].equal?($stderr)
    data["rack.input.class"] = env["rack.input"].class.name
    data["body"] = latin1(body)
    data["body_info"] = {
      "length" => body.bytesize,
      "sha256" => Digest::SHA256.hexdigest(body),
      "pieces" => pieces.length,
      "first" => pieces.first(4).map { |p| latin1(p) },
      "after" => after.bytesize,
      "encoding" => body.encoding.name,
      "rewound" => reread == body
    }
    data["pid"] = Process.pid
    out = JSON.generate(data)
    [200, { "Content-Type" => "application/json", "Content-Length" => out.bytesize.to_s }, [out]]
  end

  # Descriptors above stderr that a subprocess of the app would inherit.
  def inheritable_fds
    Dir.children("/proc/self/fd").map(&:to_i).select do |fd|
      info = File.read("/proc/self/fdinfo/#{fd}") rescue next # rubocop:disable Style/RescueModifier
      fd > 2 && (info[/^flags:\s+(\d+)/, 1].to_i(8) & 0o2000000).zero?
    end
  end

  NOT_SENT = ["should not be sent"].freeze

  ROUTES = {
    "/app/hello" => ->(_env) { text("hello world") },
    "/app/stream" => lambda do |_env|
      [200, { "Content-Type" => "text/plain" }, Lines.new(["line 0\n", "", "line 1\n", "line 2\n"])]
    end,
    "/app/stream-length" => lambda do |_env|
      [200, { "Content-Length" => "10" }, Lines.new(%w[01234 56789])]
    end,
    "/app/slow-stream" => ->(_env) { [200, {}, Lines.new(%w[one; two; three], delay: 0.05)] },
    "/app/raise-after" => ->(_env) { [200, {}, Lines.new(%w[partial never], raise_after: 1)] },
    "/app/call" => ->(_env) { [200, { "Content-Type" => "text/plain" }, Streaming.new] },
    "/app/file" => ->(_env) { [200, { "Content-Type" => "text/plain" }, FileBody.new(__FILE__)] },
    "/app/download" => lambda do |env|
      [200, { "Content-Type" => "application/octet-stream" }, FileBody.new(env["HTTP_X_FILE"])]
    end,
    "/app/close" => ->(_env) { [200, { "Content-Type" => "text/plain" }, Closing.new(%w[a b])] },
    "/app/close-raise" => ->(_env) { [200, {}, Closing.new(%w[a b], fail: true)] },
    "/app/raise" => ->(_env) { raise "echo app raised on purpose" },
    "/app/crash" => ->(_env) { exit!(7) },
    "/app/sleep-crash" => lambda do |env|
      sleep Float(env["QUERY_STRING"].empty? ? "0.5" : env["QUERY_STRING"])
      exit!(7)
    end,
    "/app/sleep" => lambda do |env|
      sleep Float(env["QUERY_STRING"].empty? ? "1" : env["QUERY_STRING"])
      text(Process.pid.to_s)
    end,
    "/app/slow" => lambda do |env|
      File.write(env["HTTP_X_MARKER"], "")
      sleep 0.3
      text("finished")
    end,
    "/app/pid" => ->(_env) { text(Process.pid.to_s) },
    "/app/env" => ->(env) { text(ENV.fetch(env["QUERY_STRING"], "")) },
    "/app/print" => lambda do |env|
      puts "hello from the app's stdout"
      warn "and its stderr"
      env["rack.errors"].write("rack.errors line\n")
      text("printed")
    end,
    "/app/status" => lambda do |env|
      code = env["QUERY_STRING"].empty? ? 204 : env["QUERY_STRING"].to_i
      [code, { "X-Status" => "set" }, ["ignored body"]]
    end,
    "/app/cookies" => ->(_env) { text("cookies", 200, { "Set-Cookie" => "a=1\nb=2" }) },
    "/app/array-header" => ->(_env) { [200, { "x-multi" => %w[one two] }, ["array header"]] },
    "/app/connection-close" => ->(_env) { [200, { "Connection" => "close" }, ["ok"]] },
    "/app/hop-by-hop" => lambda do |_env|
      headers = { "Keep-Alive" => "timeout=5", "Transfer-Encoding" => "chunked", "Date" => "app's" }
      [200, headers, ["ok"]]
    end,
    "/app/many-parts" => ->(_env) { [200, {}, ["a", "b".b, "c\u00e9"]] },
    "/app/utf8-header" => ->(_env) { [200, { "X-Name" => "caf\u00e9" }, ["caf\u00e9", "\xFF".b]] },
    "/app/bad-header" => ->(_env) { [200, { "X-Bad" => "a\r\nInjected: 1" }, NOT_SENT] },
    "/app/bad-name" => ->(_env) { [200, { "X-Bad: yes" => "1" }, NOT_SENT] },
    "/app/bad-status" => ->(_env) { ["OK", {}, NOT_SENT] },
    "/app/bad-chunk" => ->(_env) { [200, {}, [:symbol]] },
    "/app/string-status" => ->(_env) { ["201", {}, ["created"]] },
    "/app/big" => ->(_env) { [200, {}, Lines.new(Array.new(160) { "z" * 65_536 })] },
    "/app/big-array" => ->(_env) { [200, {}, ["y" * 3_000_000]] },
    "/app/inheritable-fds" => ->(_env) { text(JSON.generate(inheritable_fds)) }
  }.freeze
end

map "/lint" do
  use Rack::Lint
  run EchoRack
end

run EchoRack
