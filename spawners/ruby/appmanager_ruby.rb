# frozen_string_literal: true

# appmanager's spawner shim for Rack apps.
#
# The core execs this file with the app root as working directory, the control channel on fd 3 and
# the progress file on fd 4 (docs/protocol/spawn.md). The shim loads config.ru, answers READY, then
# serves one request at a time: each arrives on the control channel together with the client
# connection's descriptor (docs/protocol/handoff.md); the shim calls the app, writes the response
# straight to the client and reports back with "D <seq> <k|c>". When the app gets every request
# the core hands over whole connections instead (C), which appmanager_ruby_http.rb serves. With "spawn_method": "smart" it
# is a preloader instead: it loads config.ru once and forks app processes on the core's command,
# each of which then serves the same way.
#
# It reads like spawners/python/appmanager_python.py, step for step. Ruby's standard library only,
# plus the app's own Rack: it runs under whatever ruby, and bundle, the app uses. Before the bundle
# is set up it loads no gem a Gemfile.lock commonly pins (json, stringio): Bundler refuses a
# version other than the one already activated.

require "socket"

module AppManager
  PROTOCOL = 1
  SERVER_SOFTWARE = "appmanager"

  # The core sends inline bodies of up to 64 KiB with a head of up to 8 KiB (handoff.md); 128 KiB
  # leaves room. Ruby's recvmsg allocates a buffer this size for every message: kept under glibc's
  # mmap threshold it costs nothing, at 1 MiB it costs more than the rest of a small request.
  MAX_MESSAGE = 128 * 1024
  # Room for the two descriptors a request message can carry: the client and the body file. Given
  # explicitly, or Ruby's recvmsg peeks at every message first to size its buffers.
  ANCILLARY_SIZE = 64
  # How long a write may wait for a client that does not read before the shim gives up on it.
  WRITE_TIMEOUT = 60
  # An ERROR message must fit in one control-channel message; a backtrace's end is the useful part.
  MAX_TRACEBACK = 64 * 1024
  # Header names are few and repeat; their env keys are cached, up to this many.
  MAX_CACHED_HEADER_NAMES = 1000
  # Bodies up to this size go out in the same write as the head; bigger ones are not worth a copy.
  COALESCE_LIMIT = 64 * 1024
  # rack.input over a body file reads ahead in blocks of this size for gets and each.
  READ_AHEAD = 64 * 1024

  PR_SET_PDEATHSIG = 1
  SIGKILL = 9
  SPAWN_METHODS = %w[direct smart].freeze
  # How often a forked process checks that the core is still alive (spawn.md: at least every
  # second).
  PARENT_CHECK_INTERVAL = 0.5
  # sendfile(2) errors that mean "not for this file", not "the client went away".
  NO_SENDFILE = [Errno::EINVAL::Errno, Errno::ENOSYS::Errno, Errno::EOPNOTSUPP::Errno].freeze
  TRUNCATED = Socket::MSG_TRUNC | Socket::MSG_CTRUNC

  BINARY = Encoding::BINARY
  CRLF = "\r\n"
  EMPTY = "".b.freeze
  LAST_CHUNK = "0\r\n\r\n"
  CONNECTION_CLOSE = "Connection: close\r\n"
  CONNECTION_KEEP_ALIVE = "Connection: keep-alive\r\n"
  CHUNKED = "Transfer-Encoding: chunked\r\n"

  METHODS = %w[GET HEAD POST PUT DELETE PATCH OPTIONS].to_h { |m| [m.b.freeze, m] }.freeze
  SCHEMES = { "http".b => "http", "https".b => "https" }.freeze
  # Response headers the shim owns, by lowercased name: framing and connection management are its
  # job, not the app's. Every other valid name is :plain, and Rack 3's rack.* names are :rack.
  SPECIAL_HEADERS = {
    "connection" => :connection, "keep-alive" => :hop_by_hop, "transfer-encoding" => :hop_by_hop,
    "content-length" => :content_length, "date" => :date
  }.freeze
  # Response header names are few and repeat; what each one is is cached, up to this many.
  MAX_CACHED_RESPONSE_NAMES = 1000
  # Header names must not break the head apart; values may hold "\n" only as Rack 2's separator.
  INVALID_NAME = /[\r\n:]|\A\z/.freeze
  CONTENT_LENGTH_VALUE = /\A\s*\d+\s*\z/.freeze
  CR_OR_LF = /[\r\n]/.freeze
  DIGITS = /\A\d+\z/.freeze
  # The env keys the shim sets on every request, besides the headers'.
  REQUEST_KEYS = %w[
    REQUEST_METHOD REQUEST_URI SERVER_PROTOCOL PATH_INFO QUERY_STRING REMOTE_ADDR REMOTE_PORT
    SERVER_NAME SERVER_PORT rack.url_scheme rack.input
  ].freeze
  SLASH = "/".ord

  # The core sent something this shim cannot read; a bug on one side or a version mismatch.
  class ProtocolError < StandardError; end

  # config.ru loaded, but what it runs is not a Rack app.
  class NoAppError < StandardError; end

  # A write to the client failed: it went away, reset the connection or stopped reading.
  class ClientDisconnected < StandardError; end

  # Raised by the SIGTERM handler to leave a blocking receive; never escapes Worker#serve. Not a
  # StandardError, so that no rescue on the way swallows it.
  class Stop < Exception; end

  # The handshake

  # Just enough JSON for the handshake, without the json gem, which the app's bundle may pin to
  # another version (Passenger's loaders carry their own JSON for the same reason).
  module HandshakeJSON
    # The text is not JSON, or not the JSON this reader understands.
    class ParseError < StandardError; end

    TOKEN = /\G\s*(?:
      ("(?:[^"\\]|\\.)*") |                  # 1: a string
      (-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?) |   # 2: a number
      (true|false|null) |                    # 3: a literal
      ([{}\[\],:])                           # 4: punctuation
    )/mx.freeze
    ESCAPES = {
      '"' => '\\"', "\\" => "\\\\", "\n" => "\\n", "\r" => "\\r", "\t" => "\\t",
      "\b" => "\\b", "\f" => "\\f"
    }.freeze
    UNESCAPES = { "b" => "\b", "f" => "\f", "n" => "\n", "r" => "\r", "t" => "\t" }.freeze
    LITERALS = { "true" => true, "false" => false, "null" => nil }.freeze

    module_function

    def generate(value)
      case value
      when Hash then "{#{value.map { |k, v| "#{quote(k.to_s)}:#{generate(v)}" }.join(",")}}"
      when Array then "[#{value.map { |v| generate(v) }.join(",")}]"
      when Integer, true, false then value.to_s
      when Float then value.finite? ? value.to_s : "null"
      when nil then "null"
      else quote(value.to_s)
      end
    end

    def quote(text)
      escaped = AppManager.utf8(text).gsub(/["\\\x00-\x1f]/) do |c|
        ESCAPES[c] || format("\\u%04x", c.ord)
      end
      "\"#{escaped}\""
    end

    def parse(text)
      text = text.dup.force_encoding(Encoding::UTF_8)
      raise ParseError, "not UTF-8" unless text.valid_encoding?

      value, pos = value_at(text, 0)
      raise ParseError, "unexpected text at offset #{pos}" unless text.match?(/\G\s*\z/, pos)

      value
    end

    # The value starting at pos, and the offset after it.
    def value_at(text, pos)
      token, pos = token_at(text, pos)
      case token
      when :"{" then object_at(text, pos)
      when :"[" then array_at(text, pos)
      when Symbol then raise ParseError, "unexpected #{token.inspect} at offset #{pos}"
      else [token, pos]
      end
    end

    def object_at(text, pos)
      object = {}
      token, after = token_at(text, pos)
      return [object, after] if token == :"}"

      loop do
        key, pos = token_at(text, pos)
        raise ParseError, "object key at offset #{pos} is not a string" unless key.is_a?(String)

        colon, pos = token_at(text, pos)
        raise ParseError, "expected ':' at offset #{pos}" unless colon == :":"

        object[key], pos = value_at(text, pos)
        token, pos = token_at(text, pos)
        return [object, pos] if token == :"}"
        raise ParseError, "expected ',' or '}' at offset #{pos}" unless token == :","
      end
    end

    def array_at(text, pos)
      array = []
      token, after = token_at(text, pos)
      return [array, after] if token == :"]"

      loop do
        value, pos = value_at(text, pos)
        array << value
        token, pos = token_at(text, pos)
        return [array, pos] if token == :"]"
        raise ParseError, "expected ',' or ']' at offset #{pos}" unless token == :","
      end
    end

    # The next token: a String, number, true, false or nil, or punctuation as a Symbol.
    def token_at(text, pos)
      match = TOKEN.match(text, pos)
      raise ParseError, "unexpected text at offset #{pos}" unless match

      token =
        if match[1] then unescape(match[1][1..-2])
        elsif match[2] then match[2].match?(/[.eE]/) ? Float(match[2]) : Integer(match[2], 10)
        elsif match[3] then LITERALS.fetch(match[3])
        else match[4].to_sym
        end
      [token, match.end(0)]
    end

    def unescape(body)
      return body unless body.include?("\\")

      text = body.gsub(/\\u([dD][89abAB]\h\h)\\u([dD][c-fC-F]\h\h)|\\u(\h{4})|\\(.)/m) do
        if Regexp.last_match(1)
          high = Regexp.last_match(1).hex
          low = Regexp.last_match(2).hex
          [0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)].pack("U")
        elsif Regexp.last_match(3)
          [Regexp.last_match(3).hex].pack("U")
        else
          UNESCAPES.fetch(Regexp.last_match(4), Regexp.last_match(4))
        end
      end
      raise ParseError, "string with a lone surrogate" unless text.valid_encoding?

      text
    end
  end

  # What the SPAWN message says about the app; unknown keys are ignored (spawn.md).
  SpawnConfig = Struct.new(
    :protocol, :app_root, :app_type, :startup_file, :environment, :base_uri, :app_name,
    :spawn_method, :core_pid, :access_log, :max_requests,
    keyword_init: true
  ) do
    # Parses "SPAWN {json}"; raises ProtocolError when it is anything else.
    def self.from_message(message)
      tag, _, payload = message.partition(" ")
      if tag != "SPAWN"
        raise ProtocolError, "expected a SPAWN message, got #{message[0, 40].inspect}"
      end

      begin
        data = HandshakeJSON.parse(payload)
      rescue HandshakeJSON::ParseError => e
        raise ProtocolError, "SPAWN message is not JSON: #{e.message}"
      end
      raise ProtocolError, "SPAWN message is not a JSON object" unless data.is_a?(Hash)

      begin
        new(
          protocol: Integer(data.fetch("protocol")),
          app_root: data.fetch("app_root").to_s,
          app_type: (data["app_type"] || "rack").to_s,
          startup_file: data.fetch("startup_file").to_s,
          environment: (data["environment"] || "production").to_s,
          base_uri: (data["base_uri"] || "").to_s,
          app_name: (data["app_name"] || "").to_s,
          spawn_method: (data["spawn_method"] || "direct").to_s,
          core_pid: data["core_pid"] && Integer(data["core_pid"]),
          access_log: data["access_log"] == true,
          max_requests: Integer(data["max_requests"] || 0)
        )
      rescue KeyError, TypeError, ArgumentError => e
        raise ProtocolError, "SPAWN message lacks or mangles a key: #{e.message}"
      end
    end
  end

  # Blocks the app registered to run as each app process starts, as [forked_only, block], in
  # registration order; and those to run as it stops. Filled while config.ru loads.
  @starting_hooks = []
  @stopping_hooks = []

  module_function

  # Registers a block to run in each app process the preloader forks, before it serves: the place
  # to reopen what config.ru opened and a process must not share (database connections, sockets).
  # A process spawned directly loaded the app itself and runs none of these.
  def after_fork(&block)
    raise ArgumentError, "AppManager.after_fork needs a block" unless block

    @starting_hooks << [true, block]
    block
  end

  # PhusionPassenger.on_event: :starting_worker_process blocks get forked = true in a forked
  # process and false in one spawned directly, as under Passenger; :stopping_worker_process
  # blocks run when the process stops serving. Passenger's other events never happen here.
  def on_passenger_event(event, &block)
    raise ArgumentError, "PhusionPassenger.on_event needs a block" unless block

    case event.to_sym
    when :starting_worker_process then @starting_hooks << [false, block]
    when :stopping_worker_process then @stopping_hooks << block
    end
    block
  end

  # Runs the starting hooks; an exception fails step LISTEN.
  def run_starting_hooks(forked)
    @starting_hooks.each do |forked_only, block|
      if forked_only
        block.call if forked
      else
        block.call(forked)
      end
    end
  end

  # Runs the stopping hooks; the process is on its way out, so a failure is only logged.
  def run_stopping_hooks
    @stopping_hooks.each do |block|
      block.call
    rescue StandardError => e
      log("a stopping_worker_process hook failed:\n#{e.full_message(highlight: false)}")
    end
  end

  # Sends one handshake message, "TAG {json}".
  def send_message(control, tag, payload)
    control.sendmsg("#{tag} #{HandshakeJSON.generate(payload)}")
  end

  # Step PREPARE: checks the protocol, ties the process to the core, enters the app root.
  # Returns the progress file.
  def prepare(config, control, progress_fd, parent_pid)
    if config.protocol != PROTOCOL
      raise ProtocolError,
            "the core speaks protocol #{config.protocol}; this shim speaks #{PROTOCOL}"
    end
    if config.app_type != "rack"
      raise ProtocolError, "app_type #{config.app_type.inspect} is not served by the Ruby shim"
    end
    unless SPAWN_METHODS.include?(config.spawn_method)
      raise ProtocolError, "unknown spawn_method #{config.spawn_method.inspect}"
    end

    # Subprocesses the app starts must not keep the control channel open: the core counts on EOF.
    control.close_on_exec = true
    progress = IO.for_fd(progress_fd, "r+b", autoclose: false)
    progress.close_on_exec = true
    die_with_parent(parent_pid)
    app_root = File.expand_path(config.app_root)
    $LOAD_PATH.unshift(app_root) unless $LOAD_PATH.include?(app_root)
    Dir.chdir(app_root)
    ENV["RACK_ENV"] ||= config.environment
    ENV["RAILS_ENV"] ||= config.environment
    progress
  end

  # Asks Linux to SIGKILL this process when the core dies, and exits if it already has.
  #
  # Best effort, through Fiddle (Ruby's ctypes): without it, or off Linux, the process relies on
  # EOF on the control channel, which it sees between requests.
  def die_with_parent(parent_pid)
    return unless RUBY_PLATFORM.include?("linux")

    begin
      require "fiddle"
      prctl = Fiddle::Function.new(
        Fiddle::Handle::DEFAULT["prctl"],
        [Fiddle::TYPE_INT] + [Fiddle::TYPE_LONG] * 4,
        Fiddle::TYPE_INT
      )
      return if prctl.call(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0
    rescue LoadError, StandardError
      return
    end
    # The core may have died before prctl took effect; then nothing would ever kill us.
    exit!(1) if Process.ppid != parent_pid
  end

  # Step LOAD_APP: loads config.ru with Rack's own builder and returns the app it runs.
  def load_app(config)
    # The app's Gemfile decides which Rack it gets, so Bundler goes first, as under Passenger.
    gemfile = ENV["BUNDLE_GEMFILE"] || File.join(Dir.pwd, "Gemfile")
    require "bundler/setup" if File.file?(gemfile)
    require "rack"
    # Rack 2 returns [app, options], Rack 3 the app alone.
    app = Rack::Builder.parse_file(config.startup_file)
    app = app.first if app.is_a?(Array)
    return app if app.respond_to?(:call)

    raise NoAppError, "#{config.startup_file} runs a #{app.class}, which does not respond to call"
  end

  # The ERROR payload for an exception raised during step.
  def failure_message(step, exc)
    text = utf8(exc.full_message(highlight: false, order: :top))
    text = "...\n#{text[-MAX_TRACEBACK..]}" if text.length > MAX_TRACEBACK
    detail = utf8(exc.message).rstrip
    detail = "exit status #{exc.status}" if exc.is_a?(SystemExit)
    message = detail.empty? ? exc.class.name : "#{exc.class}: #{detail}"
    { "step" => step, "message" => message, "traceback" => text }
  end

  # Text for the handshake's JSON, whatever its encoding: UTF-8, invalid bytes replaced.
  def utf8(text)
    text = text.to_s
    text = text.dup.force_encoding(Encoding::UTF_8) unless text.encoding == Encoding::UTF_8
    text.valid_encoding? ? text : text.scrub
  end

  # Appends str to the binary buffer buf, whatever str's encoding.
  def append(buf, str)
    buf << str
  rescue Encoding::CompatibilityError
    # Both hold non-ASCII bytes in different encodings; on the wire they are bytes either way.
    buf.force_encoding(BINARY) << str.b
  end

  # The descriptors in a message's SCM_RIGHTS ancillary data, in order, as IOs; Ruby receives
  # them close-on-exec (MSG_CMSG_CLOEXEC), so subprocesses of the app never hold clients.
  def received_ios(controls)
    if controls.length == 1
      # One SCM_RIGHTS message, as the core sends: its IOs as they are.
      data = controls[0]
      if data.level == Socket::SOL_SOCKET && data.type == Socket::SCM_RIGHTS
        return data.unix_rights || []
      end
    end
    ios = []
    controls.each { |data| ios.concat(data.unix_rights || []) if data.cmsg_is?(:SOCKET, :RIGHTS) }
    ios
  end

  # One message to stderr, which the core logs line by line with the app and pid.
  def log(message)
    $stderr.write("appmanager_ruby: #{message.rstrip}\n")
  end

  # Serving requests

  # The shim's copy of a client connection's descriptor, written with waits on select.
  #
  # The descriptor is non-blocking and its flags are shared with the core's copy, so it stays
  # non-blocking: write_nonblock and IO.select, never IO#write, which would wait without a limit.
  class ClientConnection
    # sendfile(2) through Fiddle: IO.copy_stream uses it too, but waits for a stalled client
    # forever. nil when Fiddle is missing; files are then read and written.
    SENDFILE =
      begin
        require "fiddle"
        Fiddle::Function.new(
          Fiddle::Handle::DEFAULT["sendfile"],
          [Fiddle::TYPE_INT, Fiddle::TYPE_INT, Fiddle::TYPE_VOIDP, Fiddle::TYPE_SIZE_T],
          Fiddle::TYPE_SSIZE_T
        )
      rescue LoadError, StandardError
        nil
      end

    def initialize(io)
      @io = io
    end

    # Writes all of data; raises SystemCallError (ETIMEDOUT when the client stops reading).
    def write(data)
      size = data.bytesize
      sent = @io.write_nonblock(data, exception: false)
      return if sent == size # all of it at once, as a small response goes

      sent = 0 if sent == :wait_writable
      while sent < size
        wait_writable
        sent += write_some(data.byteslice(sent, size - sent))
      end
    end

    # Sends count bytes of a regular file from offset; returns how many were sent, fewer when
    # the file turned out shorter.
    def sendfile(file, offset, count)
      return copy_file(file, offset, count) unless SENDFILE

      position = [offset].pack("q")
      total = 0
      while total < count
        sent = SENDFILE.call(@io.fileno, file.fileno, position, count - total)
        if sent.negative?
          errno = Fiddle.last_error
          if errno == Errno::EAGAIN::Errno
            wait_writable
            next
          end
          next if errno == Errno::EINTR::Errno
          return copy_file(file, offset, count) if total.zero? && NO_SENDFILE.include?(errno)

          raise SystemCallError.new("sendfile", errno)
        end
        break if sent.zero?

        total += sent
      end
      total
    end

    # sendfile's fallback, for files that cannot be sent directly: pread and write.
    def copy_file(file, offset, count)
      total = 0
      while total < count
        begin
          block = file.pread([count - total, 1 << 20].min, offset + total)
        rescue EOFError
          break
        end
        write(block)
        total += block.bytesize
      end
      total
    end

    # One write_nonblock: how many bytes the socket took, 0 when its buffer is full. (select may
    # say writable when the buffer is still too full.)
    def write_some(data)
      sent = @io.write_nonblock(data, exception: false)
      sent == :wait_writable ? 0 : sent
    end

    # Waits until the client can take more bytes, at most WRITE_TIMEOUT seconds.
    def wait_writable
      return if IO.select(nil, [@io], nil, WRITE_TIMEOUT)

      raise Errno::ETIMEDOUT, "client read nothing for #{WRITE_TIMEOUT} s"
    end
  end

  # rack.input for a body in a file: the first length bytes, read by pread from offset 0.
  #
  # pread leaves the descriptor's offset alone: SCM_RIGHTS passes the core's open file
  # description, offset included. The descriptor belongs to the Worker, which closes it after the
  # request. Reads ahead in blocks for gets and each; read goes to the file directly.
  class BodyFile
    def initialize(io, length)
      @io = io
      @length = length
      @file_pos = 0 # where the next pread starts
      @buffer = EMPTY # bytes read ahead, unread from @offset on
      @offset = 0
    end

    # IO#read's contract: all that is left without length, nil at the end with one.
    def read(length = nil, outbuf = nil)
      want = @length - @file_pos + @buffer.bytesize - @offset
      if length
        raise ArgumentError, "negative length #{length} given" if length.negative?

        if want <= 0 && length.positive?
          outbuf&.clear
          return nil
        end
        want = length if length < want
      end
      data = take(want)
      outbuf ? outbuf.replace(data) : data
    end

    def gets
      loop do
        newline = @buffer.index("\n", @offset)
        if newline
          line = @buffer.byteslice(@offset, newline + 1 - @offset)
          @offset = newline + 1
          return line
        end
        next if fill

        return nil if @offset >= @buffer.bytesize

        line = @buffer.byteslice(@offset, @buffer.bytesize - @offset)
        @offset = @buffer.bytesize
        return line
      end
    end

    def each
      while (line = gets)
        yield line
      end
      self
    end

    def rewind
      @file_pos = 0
      @buffer = EMPTY
      @offset = 0
      0
    end

    def size
      @length
    end

    def close
      nil
    end

    private

    # Reads the next block behind what is buffered; false at the end of the body.
    def fill
      return false if @file_pos >= @length

      block = pread([READ_AHEAD, @length - @file_pos].min)
      return false unless block

      rest = @buffer.bytesize - @offset
      @buffer = rest.zero? ? block : @buffer.byteslice(@offset, rest) << block
      @offset = 0
      true
    end

    # n bytes, fewer at the end of the body: the buffered ones, then the file's.
    def take(count)
      buffered = @buffer.bytesize - @offset
      if count <= buffered
        data = @buffer.byteslice(@offset, count)
        @offset += count
        return data
      end
      data = String.new(capacity: count)
      data << @buffer.byteslice(@offset, buffered) if buffered.positive?
      @buffer = EMPTY
      @offset = 0
      while data.bytesize < count && (block = pread(count - data.bytesize))
        data << block
      end
      data
    end

    def pread(count)
      block = @io.pread(count, @file_pos)
      @file_pos += block.bytesize
      block
    rescue EOFError
      # The file is shorter than body_len said; its end is the body's end.
      @length = @file_pos
      nil
    end
  end

  # The progress file (handoff.md): the seq of the response being begun, at offset 0, then the
  # slots of the connections the process holds whole, 8 bytes each.
  #
  # Written through a shared mapping of the file, a store that costs no system call, where Fiddle
  # can map it (mmap(2)); else with pwrite. Either way the core sees the value when it reads the
  # file after the process died.
  class ProgressFile
    MMAP =
      begin
        require "fiddle"
        Fiddle::Function.new(
          Fiddle::Handle::DEFAULT["mmap"],
          [Fiddle::TYPE_VOIDP, Fiddle::TYPE_SIZE_T, Fiddle::TYPE_INT, Fiddle::TYPE_INT,
           Fiddle::TYPE_INT, Fiddle::TYPE_LONG],
          Fiddle::TYPE_VOIDP
        )
      rescue LoadError, StandardError
        nil
      end
    PROT_READ_WRITE = 3
    MAP_SHARED = 1
    SIZE = 8

    def initialize(io)
      @io = io
      @size = 0
      @map = map(io)
    end

    def write(seq)
      data = [seq].pack("Q<")
      if @map
        @map[0, SIZE] = data
      else
        @io.pwrite(data, 0)
      end
    end

    # Sets a connection's slot (handoff.md, "Whole connections").
    def set_slot(slot, word)
      offset = SIZE + SIZE * slot
      data = [word].pack("Q<")
      if @map && offset + SIZE <= @size
        @map[offset, SIZE] = data
      else
        @io.pwrite(data, offset)
      end
    rescue SystemCallError, IOError
      nil # a slot the file cannot hold: the core then closes that connection rather than 502
    end

    private

    # The whole file mapped shared, or nil. Only a regular file (a memfd is one) that holds the
    # seq: a store past a file's end is a SIGBUS. Pages are only allocated where written.
    def map(io)
      return nil unless MMAP && RUBY_PLATFORM.include?("linux")

      stat = io.stat
      return nil unless stat.file? && stat.size >= SIZE

      pointer = MMAP.call(nil, stat.size, PROT_READ_WRITE, MAP_SHARED, io.fileno, 0)
      return nil if pointer.null? || pointer.to_i == -1

      @size = stat.size
      pointer.size = stat.size
      pointer
    rescue StandardError
      nil
    end
  end

  # The Date response header line, formatted at most once per second.
  class DateHeader
    def initialize
      @second = -1
      @line = nil
    end

    def line
      now = Process.clock_gettime(Process::CLOCK_REALTIME, :second)
      if now != @second
        # Ruby's strftime names days and months in English, whatever the locale.
        @line = Time.at(now).utc.strftime("Date: %a, %d %b %Y %H:%M:%S GMT\r\n").freeze
        @second = now
      end
      @line
    end
  end

  # The object a Rack 3 streaming body (one that responds to call, not each) writes to.
  class StreamBody
    def initialize(response)
      @response = response
      @closed = false
    end

    def write(data)
      text = data.to_s
      @response.write(text)
      text.bytesize
    end

    def <<(data)
      write(data)
      self
    end

    def flush
      self
    end

    # The request body was read by the core; the stream has nothing to offer.
    def read(*)
      nil
    end

    def close_read; end

    def close
      @closed = true
    end
    alias close_write close

    def closed?
      @closed
    end
  end

  # What every response of a process shares: the progress file, the Date line, and the caches
  # that spare each response work its predecessors did (status lines, what each header name is).
  class ResponseContext
    attr_reader :progress, :date, :status_lines, :header_kinds

    def initialize(progress, status_lines)
      @progress = ProgressFile.new(progress)
      @date = DateHeader.new
      # Status code => status line; codes Rack knows no reason for are added as they come.
      @status_lines = status_lines
      # Response header name => what the shim does with it (SPECIAL_HEADERS, :plain or :rack),
      # for the valid names seen so far.
      @header_kinds = {}
    end

    # What the shim does with a response header; raises for a name that is not a valid one.
    def header_kind(name)
      raise TypeError, "header name #{name.inspect} is not a String" unless name.is_a?(String)
      if INVALID_NAME.match?(name)
        raise ArgumentError, "header name #{name.inspect} holds CR, LF or ':'"
      end

      # Rack 3 reserves rack.* names for talking to the server.
      kind = name.start_with?("rack.") ? :rack : SPECIAL_HEADERS[name.downcase] || :plain
      @header_kinds[name] = kind if @header_kinds.size < MAX_CACHED_RESPONSE_NAMES
      kind
    end
  end

  # One response on its way to the client: what the app returned and what has been sent.
  #
  # Lives for one request. Headers go out lazily, with the first non-empty body chunk or at the
  # end. Invariants: once headers_sent is true, the status and headers never change and chunked
  # and remaining describe the framing; keep_alive only goes from true to false; sent is -1 until
  # the head has been written, then the body bytes written since (for the access log, in D).
  class Response
    attr_reader :seq, :headers_sent, :finished, :bodiless, :code, :sent
    attr_accessor :keep_alive

    def initialize(context, conn, seq, is_head, http11, client_keepalive, keep_alive)
      @context = context
      @conn = conn
      @seq = seq
      @is_head = is_head
      @http11 = http11
      # An HTTP/1.0 client asked for keep-alive; it only keeps the connection if told so.
      @client_keepalive = client_keepalive
      # Whether the connection may stay open; start and the framing can only lower it.
      @keep_alive = keep_alive
      # The status line and the app's header lines, which head completes.
      @head = nil
      @content_length = nil
      @has_date = false
      @bodiless = is_head
      @headers_sent = false
      @chunked = false
      # Bytes of the app's Content-Length still to send; nil when the length is not the app's.
      @remaining = nil
      @finished = false
      @code = 0
      # Body bytes written, for the access log; -1 until the head went out.
      @sent = -1
      # Where, and with what, the response's start is recorded (handoff.md): the seq at the
      # progress file's start, or a connection's slot.
      @progress = context.progress
      @mark = seq
    end

    # Records the response's start in a connection's slot instead: word, through progress.
    def mark(progress, word)
      @progress = progress
      @mark = word
    end

    # Validates and takes the status and headers the app returned; raises before storing any.
    def start(status, headers)
      code = status
      code = status_code(status) unless status.instance_of?(Integer) && status.between?(100, 999)
      context = @context
      # Grown as it fills: cheaper, for a small head, than one String.new with room.
      head = +(context.status_lines[code] ||= "HTTP/1.1 #{code} \r\n".freeze)
      content_length = nil
      has_date = false
      keep_alive = @keep_alive
      kinds = context.header_kinds
      headers.each do |name, value|
        case kinds[name] || context.header_kind(name)
        when :plain
          if value.instance_of?(String) && !value.match?(CR_OR_LF)
            add_line(head, name, value)
          else
            add_header(head, name, value)
          end
        when :content_length
          text = value.is_a?(Array) && value.length == 1 ? value[0] : value
          if text.instance_of?(String) && text.match?(DIGITS)
            add_line(head, name, text)
          else
            unless text.is_a?(String) && text.match?(CONTENT_LENGTH_VALUE)
              raise ArgumentError, "invalid Content-Length #{value.inspect}"
            end

            add_header(head, name, text)
          end
          content_length = text.to_i
        when :date
          has_date = true
          add_header(head, name, value)
        when :connection
          keep_alive = false if Array(value).any? { |v| v.to_s.downcase.include?("close") }
        end
        # :hop_by_hop and :rack headers are dropped.
      end
      @code = code
      @head = head
      @content_length = content_length
      @has_date = has_date
      @keep_alive = keep_alive
      # 1xx, 204 and 304 responses have no body, whatever the app returns.
      @bodiless = @is_head || code < 200 || code == 204 || code == 304
    end

    # Sends a response whose body is known in full: headers and body in one write.
    def send_whole(body)
      if @bodiless
        # HEAD: a Content-Length the body gives is what GET would send; an empty one says
        # nothing (the app may skip the body for HEAD). 1xx/204/304 never get one.
        if @is_head && !body.empty? && @content_length.nil?
          framing = "Content-Length: #{body.bytesize}\r\n"
        end
        send_data(head(framing), 0, true)
      elsif @content_length.nil?
        send_head_and("Content-Length: #{body.bytesize}\r\n", body)
      else
        # The client will wait for bytes that never come.
        @keep_alive = false if body.bytesize < @content_length
        body = body.byteslice(0, @content_length) if body.bytesize > @content_length
        send_head_and(nil, body)
      end
      @finished = true
    end

    # The path of every chunk of a streamed body.
    def write(data)
      raise TypeError, "body chunks must be Strings, not #{data.class}" unless data.is_a?(String)

      unless @headers_sent
        start_stream(data) unless data.empty?
        return
      end
      return if @bodiless || data.empty?

      if @chunked
        chunk = String.new(capacity: data.bytesize + 12)
        chunk << data.bytesize.to_s(16) << CRLF
        AppManager.append(chunk, data) << CRLF
        send_data(chunk, data.bytesize)
      elsif @remaining
        return unless @remaining.positive?

        data = data.byteslice(0, @remaining) if data.bytesize > @remaining
        @remaining -= data.bytesize
        send_data(data, data.bytesize)
      else
        send_data(data, data.bytesize)
      end
    end

    # Ends a streamed body: the last chunk, or the headers when every chunk was empty.
    def finish
      return send_whole(EMPTY) unless @headers_sent

      if @chunked
        send_data(LAST_CHUNK, 0)
      elsif @remaining&.positive?
        @keep_alive = false
      end
      @finished = true
    end

    # Sends a regular file with sendfile(2); false, having sent nothing, when it is not one.
    def send_file(path)
      return false if @headers_sent || (@bodiless && !@is_head)

      begin
        file = File.open(path, "rb")
      rescue SystemCallError, TypeError
        return false
      end
      begin
        return false unless file.stat.file?

        size = file.size
        count = @content_length.nil? ? size : [size, @content_length].min
        send_data(head(@content_length.nil? ? "Content-Length: #{size}\r\n" : nil), 0, true)
        if @is_head || count.zero?
          @finished = true
          return true
        end
        begin
          sent = @conn.sendfile(file, 0, count)
        rescue SystemCallError, IOError => e
          @keep_alive = false
          raise ClientDisconnected, "sending the file failed: #{e.message}"
        end
        @sent = sent
        # The file shrank under us; the length we announced is a lie.
        @keep_alive = false if sent < (@content_length || size)
        @finished = true
        true
      ensure
        file.close
      end
    end

    private

    def status_code(status)
      code = status.is_a?(Integer) ? status : Integer(status.to_s, 10)
      raise ArgumentError unless code.between?(100, 999)

      code
    rescue ArgumentError, TypeError
      raise ArgumentError, "invalid Rack status #{status.inspect}; expected e.g. 200"
    end

    # Rack 2 puts several values of one header in one String, split by "\n"; Rack 3 in an Array.
    def add_header(head, name, value)
      if value.is_a?(String)
        raise ArgumentError, "header #{name}: #{value.inspect} holds CR" if value.include?("\r")

        unless value.include?("\n")
          add_line(head, name, value)
          return
        end
        value = value.split("\n")
      end
      raise TypeError, "header #{name}: #{value.inspect} is not a String" unless value.is_a?(Array)

      value.each do |v|
        raise TypeError, "header #{name}: #{v.inspect} is not a String" unless v.is_a?(String)

        add_header(head, name, v)
      end
    end

    # Appends the header line "name: value", whatever the two Strings' encodings.
    def add_line(head, name, value)
      size = head.bytesize
      head << name << ": " << value << CRLF
    rescue Encoding::CompatibilityError
      # Non-ASCII bytes in different encodings; on the wire they are bytes either way. The line
      # goes again, whole, after what came before it.
      head.force_encoding(BINARY)
      head.slice!(size, head.bytesize - size)
      head << name.b << ": " << value.b << CRLF
    end

    # The status line and headers, framing (a Content-Length or Transfer-Encoding line, or nil)
    # included; the Connection header follows keep_alive. Called once, when the head goes out.
    def head(framing)
      buf = @head
      buf << @context.date.line unless @has_date
      buf << framing if framing
      if !@keep_alive
        buf << CONNECTION_CLOSE
      elsif !@http11 && @client_keepalive
        buf << CONNECTION_KEEP_ALIVE
      end
      buf << CRLF
    end

    # The head and a whole body: one write when the body is small enough to copy.
    def send_head_and(framing, body)
      if body.bytesize > COALESCE_LIMIT
        send_data(head(framing), 0, true)
        send_data(body, body.bytesize)
      else
        send_data(AppManager.append(head(framing), body), body.bytesize, true)
      end
    end

    # Sends the headers with the first chunk of a body of not-yet-known length.
    def start_stream(first)
      if @bodiless
        send_data(head(nil), 0, true)
      elsif @content_length
        @remaining = @content_length - [first.bytesize, @content_length].min
        first = first.byteslice(0, @content_length) if first.bytesize > @content_length
        send_data(AppManager.append(head(nil), first), first.bytesize, true)
      elsif @http11
        @chunked = true
        buf = head(CHUNKED)
        buf << first.bytesize.to_s(16) << CRLF
        send_data(AppManager.append(buf, first) << CRLF, first.bytesize, true)
      else
        # HTTP/1.0 cannot chunk: the body ends where the connection does.
        @keep_alive = false
        send_data(AppManager.append(head(nil), first), first.bytesize, true)
      end
    end

    # Writes to the client, count bytes of body among data; the first write of the response (the
    # head) records progress first.
    def send_data(data, count, head = false)
      if head
        # handoff.md: the core reads this only if the process dies holding the request.
        @progress.write(@mark)
        @headers_sent = true
      end
      begin
        @conn.write(data)
      rescue SystemCallError, IOError => e
        @keep_alive = false
        raise ClientDisconnected, "writing the response failed: #{e.message}"
      end
      if head
        @sent = count
      else
        @sent += count
      end
    end
  end

  # Serves requests from the control channel, one at a time, for the life of the process.
  #
  # Created in step LISTEN once the app is loaded; lives until EOF on the control channel or
  # SIGTERM. Owns the descriptors that come with each request and closes them when the request is
  # answered; between requests it keeps only caches.
  class Worker
    attr_reader :context, :stopping
    attr_accessor :idle

    def initialize(control, progress, app, config)
      # Only now, with the app's bundle set up: stringio is a gem the bundle may pin, and
      # connections need tempfile.
      require "stringio"
      require_relative "appmanager_ruby_http"
      @control = control
      @config = config
      # Serves whole connections once the core hands over the first (C).
      @connections = nil
      @app = app
      @development = config.environment == "development"
      # "/" or "/app/" mean the same mount point as "" and "/app".
      @base_uri = config.base_uri.sub(%r{/+\z}, "").freeze
      # Compared with request paths, which are bytes.
      @base_path = @base_uri.b.freeze
      # Every status line Rack knows a reason for, made before the first request needs one.
      reasons = defined?(Rack::Utils::HTTP_STATUS_CODES) ? Rack::Utils::HTTP_STATUS_CODES : {}
      status_lines = reasons.to_h { |code, why| [code, "HTTP/1.1 #{code} #{why}\r\n".freeze] }
      @context = ResponseContext.new(progress, status_lines)
      @header_keys = {}
      @base_env = {
        "SCRIPT_NAME" => @base_uri,
        "SERVER_SOFTWARE" => SERVER_SOFTWARE,
        "rack.errors" => $stderr,
        "rack.multithread" => false,
        "rack.multiprocess" => true,
        "rack.run_once" => false,
        # v1 hands over requests, not connections: the core keeps reading the client.
        "rack.hijack?" => false
      }
      # Rack 3 made rack.version optional, and Rack 3.1 dropped the constant.
      @base_env["rack.version"] = Rack::VERSION if defined?(Rack::VERSION)
      # The keys every request sets, in place already: a copy of this table has room for them
      # and a few headers, and is not grown and rehashed while the request fills it.
      REQUEST_KEYS.each { |key| @base_env[key] = nil }
      @idle = false
      @stopping = false
    end

    # Takes requests until EOF on the control channel or SIGTERM; a TERM during a request lets
    # the request finish.
    def serve
      loop do
        connections = @connections
        if connections && !connections.connections.empty?
          # Whole connections held: their loop reads the control channel too, until none is left.
          return unless connections.run
          return if connections.finished?

          next
        end
        # idle goes up before stopping is checked, so a TERM between the two still stops us. A
        # TERM right after the receive returns loses that request; the core sees the process die
        # holding it with no progress recorded, and answers 502.
        @idle = true
        return if @stopping

        message, _, msg_flags, *controls =
          @control.recvmsg(MAX_MESSAGE, 0, ANCILLARY_SIZE, scm_rights: true)
        @idle = false
        return if message.empty? && controls.empty?

        handle_message(message, msg_flags, AppManager.received_ios(controls))
      end
    rescue Stop
      nil
    rescue SystemCallError, IOError => e
      # The core is gone; nothing left to serve.
      AppManager.log("control channel failed: #{e.message}")
    end

    # Step LISTEN: the signal handling serving needs, in place before READY goes out.
    #
    # SIGPIPE stays as Ruby set it: a failed write raises EPIPE, and unlike SIG_IGN, Ruby's
    # handler is not inherited by the app's subprocesses.
    def listen
      Signal.trap("TERM") { on_sigterm }
    end

    # Stops at once when idle; otherwise after the current request is answered.
    def on_sigterm
      @stopping = true
      raise Stop if @idle
    end

    # Serves one message from the core: a request (Q), answered with D, or a connection (C).
    def handle_message(message, msg_flags, ios)
      return take_connection(message, msg_flags, ios) if message.start_with?("C ")

      begin
        reply = handle(message, msg_flags, ios)
      ensure
        ios.each(&:close)
      end
      # send, not sendmsg: one message all the same, without sendmsg's Ruby-side wrapper.
      @control.send(reply, 0) if reply
    end

    # Takes a whole connection (C); a malformed message is logged and answered X.
    def take_connection(message, msg_flags, ios)
      end_of_line = message.index("\n") || message.bytesize
      fields = message.byteslice(0, end_of_line).split(" ")
      @connections ||= ConnectionServer.new(self, @control, @context.progress, @config)
      begin
        raise ProtocolError, "message or descriptors truncated" unless (msg_flags & TRUNCATED).zero?

        @connections.add(message, end_of_line, fields, ios)
      rescue StandardError => e
        AppManager.log("connection: protocol error: #{e.message}")
        ios.each { |io| io.close unless io.closed? }
        seq = fields[1]
        @control.send("X #{seq} 0", 0) if seq&.match?(DIGITS)
      end
    end

    # Serves one Q message; returns the D reply, or nil when it has no seq. The reply carries the
    # status and the body bytes sent, for the access log, once the response began.
    def handle(message, msg_flags, ios)
      end_of_line = message.index("\n") || message.bytesize
      fields = message.byteslice(0, end_of_line).split(" ")
      seq = fields[1]
      seq = seq.to_i if seq&.match?(DIGITS)
      unless seq.is_a?(Integer)
        AppManager.log("ignoring unreadable control message #{message[0, 80].inspect}")
        return nil
      end
      begin
        response = serve_request(message, msg_flags, ios, end_of_line, fields, seq)
      rescue ProtocolError => e
        AppManager.log("request #{seq}: protocol error: #{e.message}")
        return "D #{seq} c"
      rescue StandardError => e
        # App errors are handled in run_app; this is the shim's own failure (a bad progress
        # descriptor, say). The process can go on; this connection cannot.
        text = e.full_message(highlight: false, order: :top)
        AppManager.log("request #{seq}: internal error:\n#{text}")
        return "D #{seq} c"
      end
      keep = response.keep_alive && response.finished ? "k" : "c"
      sent = response.sent
      sent.negative? ? "D #{seq} #{keep}" : "D #{seq} #{keep} #{response.code} #{sent}"
    end

    # Reads a request message, calls the app on it; returns its response, as far as it went.
    def serve_request(message, msg_flags, ios, end_of_line, fields, seq)
      raise ProtocolError, "message or descriptors truncated" unless (msg_flags & TRUNCATED).zero?
      if fields.length != 10 || fields[0] != "Q"
        raise ProtocolError, "expected 10 fields in a Q line, got #{fields.join(" ").inspect}"
      end

      _, _, flags, raddr, rport, saddr, sport, scheme, head_len, body_len = fields
      head_len = Integer(head_len, 10)
      body_len = Integer(body_len, 10)
      if flags == "K" # the common case, spared the searches below
        body_in_file = false
        may_keep_alive = true
      else
        body_in_file = flags.include?("F")
        # An upgrade request makes the connection the process's until its D, which closes it.
        may_keep_alive = flags.include?("K") && !flags.include?("U")
      end
      start = end_of_line + 1
      expected = start + head_len + (body_in_file ? 0 : body_len)
      if expected != message.bytesize || ios.length != (body_in_file ? 2 : 1)
        raise ProtocolError,
              "#{message.bytesize} bytes and #{ios.length} fds do not match the Q line"
      end

      env, is_head, http11, client_close, client_keepalive =
        environ(message.byteslice(start, head_len), body_len)
      env["REMOTE_ADDR"] = raddr
      env["REMOTE_PORT"] = rport
      env["SERVER_NAME"] = saddr
      env["SERVER_PORT"] = sport
      env["rack.url_scheme"] = SCHEMES[scheme] || scheme
      env["rack.input"] =
        if body_in_file
          BodyFile.new(ios[1], body_len)
        else
          StringIO.new(body_len.zero? ? EMPTY : message.byteslice(start + head_len, body_len))
        end

      keep_alive = may_keep_alive && !client_close && (http11 || client_keepalive)
      response = Response.new(
        @context, ClientConnection.new(ios[0]), seq, is_head, http11, client_keepalive, keep_alive
      )
      run_app(env, response)
      response
    end

    # Builds the env from the request head; also returns, for the response: is it HEAD, is it
    # HTTP/1.1, did the client ask to close, did an HTTP/1.0 client ask for keep-alive. With a
    # body_len (the core's de-chunked length) the framing headers are set to it; with nil they
    # stay as sent, for a connection's own parser to read.
    def environ(head, body_len)
      # Lines end at LF; CR is stripped from what matters: CRLF is standard, a bare LF costs
      # nothing. The head is bytes, so index counts bytes; lines are found in it, not split off.
      size = head.bytesize
      eol = head.index("\n") || size
      request_line = head.byteslice(0, eol)
      method, target, version, extra = request_line.split(" ")
      if version.nil? || extra
        raise ProtocolError, "unreadable request line #{request_line[0, 80].inspect}"
      end

      env = @base_env.dup
      env["REQUEST_METHOD"] = METHODS[method] || method
      env["REQUEST_URI"] = target
      env["SERVER_PROTOCOL"] = version
      # Request targets are bytes: index counts bytes. PATH_INFO is a String of its own, not
      # REQUEST_URI's, which an app that changes one in place would change too.
      query = target.index("?")
      if query
        env["PATH_INFO"] = path_info(target.byteslice(0, query))
        env["QUERY_STRING"] = target.byteslice(query + 1, target.bytesize - query - 1)
      else
        env["PATH_INFO"] = path_info(target.dup)
        env["QUERY_STRING"] = EMPTY
      end

      keys = @header_keys
      start = eol + 1
      while start < size
        eol = head.index("\n", start) || size
        colon = head.index(":", start)
        break unless colon # no header in the rest of the head

        if colon < eol # else this line has none
          name = head.byteslice(start, colon - start)
          key = keys[name]
          key = environ_key(name) if key.nil?
          unless key.empty?
            value = head.byteslice(colon + 1, eol - colon - 1)
            value.strip! # in place: one String fewer per header
            previous = env[key]
            env[key] = previous ? "#{previous}#{key == "HTTP_COOKIE" ? "; " : ", "}#{value}" : value
          end
        end
        start = eol + 1
      end

      if body_len
        # The core de-chunked the body; its length is body_len, whatever the head says.
        chunked = env.delete("HTTP_TRANSFER_ENCODING")
        if body_len.positive? || chunked || env.key?("CONTENT_LENGTH")
          env["CONTENT_LENGTH"] = body_len.to_s
        end
      end

      client_close = client_keepalive = false
      connection = env["HTTP_CONNECTION"]
      if connection
        if connection.casecmp?("keep-alive")
          client_keepalive = true
        elsif connection.casecmp?("close")
          client_close = true
        else
          tokens = connection.downcase.split(",").map(&:strip)
          client_close = tokens.include?("close")
          client_keepalive = tokens.include?("keep-alive")
        end
      end
      [env, method == "HEAD", version == "HTTP/1.1", client_close, client_keepalive]
    end

    # PATH_INFO: the path as sent, not percent-decoded (the Rack SPEC), without the base URI.
    def path_info(path)
      if !path.start_with?("/") && path.include?("://")
        # absolute-form ("http://host/path"): keep only the path.
        path = "/#{path.split("://", 2)[1].partition("/")[2]}"
      end
      base = @base_path
      if !base.empty? && path.start_with?(base) &&
         (path.bytesize == base.bytesize || path.getbyte(base.bytesize) == SLASH)
        return path.byteslice(base.bytesize, path.bytesize - base.bytesize)
      end

      path
    end

    # The env key for a request header name, or "" to drop the header.
    def environ_key(name)
      key = EMPTY
      # Names with "_" would collide with the "-" spelling once mapped (header smuggling), and
      # whitespace in a name is never valid; nginx and gunicorn drop both too. Connector fields
      # (!~) are the core's alone: a client's never reach the app.
      unless name.empty? || name.match?(/[_ \t\r]/) || name.start_with?("!~")
        key = name.upcase.tr("-", "_")
        key = "HTTP_#{key}" unless key == "CONTENT_TYPE" || key == "CONTENT_LENGTH"
        key = -key
      end
      @header_keys[name] = key if @header_keys.size < MAX_CACHED_HEADER_NAMES
      key
    end

    # Calls the app and sends what it returns; errors become a 500 page or a closed connection,
    # and the body's close is always called.
    def run_app(env, response)
      status, headers, body = @app.call(env)
      begin
        response.start(status, headers)
        send_body(body, response)
      ensure
        body.close if body.respond_to?(:close)
      end
    rescue StandardError, ScriptError, SystemStackError => e
      app_failed(e, env, response)
    end

    # Sends the app's body, taking the cheapest path its type allows.
    def send_body(body, response)
      # The hot path: the whole body is known, so one write carries headers and body.
      if body.instance_of?(Array)
        chunk = body[0]
        return response.send_whole(chunk) if body.length == 1 && chunk.instance_of?(String)

        return response.send_whole(join(body))
      end
      return if body.respond_to?(:to_path) && response.send_file(body.to_path)

      if body.respond_to?(:each)
        # Rack 3 lets a server take an enumerable body whole; Rack 2 bodies wrapping an Array
        # (BodyProxy) forward to_ary to it.
        if body.respond_to?(:to_ary) && (array = body.to_ary).instance_of?(Array)
          return response.send_whole(join(array))
        end

        body.each do |chunk|
          response.write(chunk)
          break if response.bodiless && response.headers_sent # the rest would be thrown away
        end
      elsif body.respond_to?(:call)
        body.call(StreamBody.new(response))
      else
        raise TypeError, "the response body, a #{body.class}, responds to neither each nor call"
      end
      response.finish
    end

    # An Array body as one String.
    def join(array)
      return EMPTY if array.empty?

      array.each do |chunk|
        next if chunk.is_a?(String)

        raise TypeError, "body chunks must be Strings, not #{chunk.class}"
      end
      return array[0] if array.length == 1

      begin
        array.join
      rescue Encoding::CompatibilityError
        array.map(&:b).join
      end
    end

    # Answers 500 when nothing was sent yet; otherwise the connection must close.
    def app_failed(exc, env, response)
      if exc.is_a?(ClientDisconnected)
        response.keep_alive = false
        return
      end
      request = "#{env["REQUEST_METHOD"]} #{env["REQUEST_URI"]}"
      text = exc.full_message(highlight: false, order: :top)
      AppManager.log("error in request #{response.seq} (#{request}):\n#{text}")
      if response.headers_sent
        response.keep_alive = false unless response.finished
        return
      end
      begin
        response.start(500, { "Content-Type" => "text/html; charset=utf-8" })
        response.send_whole(error_page(text))
      rescue ClientDisconnected
        response.keep_alive = false
      end
    end

    # The 500 page; the backtrace only in development, where it helps more than it leaks.
    def error_page(text)
      detail =
        if @development
          "<pre>#{text.gsub("&", "&amp;").gsub("<", "&lt;").gsub(">", "&gt;")}</pre>"
        else
          "<p>The application failed to answer this request.</p>"
        end
      "<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>" \
        "<body><h1>Internal Server Error</h1>#{detail}</body></html>\n"
    end
  end

  # The process that loaded the app once and forks app processes from it on the core's command
  # (spawn.md, "Smart spawning"), so that each starts with the app already in memory.
  #
  # Created after LOAD_APP when SPAWN says smart; runs until EOF on its control channel, then the
  # process exits 0 and leaves the processes it forked to the core, which is their subreaper.
  # Invariant: @children holds exactly the pids it forked whose exit it has not yet reported.
  class Preloader
    def initialize(control, progress, core_pid)
      @control = control
      @progress = progress
      @core_pid = core_pid
      @children = {}
      # The CHLD handler only writes here, to wake the loop; the loop reaps.
      @wake_r, @wake_w = IO.pipe
    end

    # Serves FORK commands. Returns false in the preloader at EOF; returns true in a forked
    # process, whose control and progress IOs then hold its own channels at the same fds.
    def run
      Signal.trap("CHLD") { @wake_w.write_nonblock(".", exception: false) }
      loop do
        ready, = IO.select([@control, @wake_r])
        @wake_r.read_nonblock(64, exception: false) if ready.include?(@wake_r)
        reap
        next unless ready.include?(@control)

        message, _, msg_flags, *controls =
          @control.recvmsg(MAX_MESSAGE, 0, ANCILLARY_SIZE, scm_rights: true)
        ios = AppManager.received_ios(controls)
        return false if message.empty? && ios.empty?
        return true if handle(message, msg_flags, ios)
      end
    rescue SystemCallError, IOError => e
      AppManager.log("preloader channel failed: #{e.message}")
      false
    end

    private

    # Handles one FORK message; returns true in the forked process, false in the preloader.
    def handle(message, msg_flags, ios)
      seq = fork_seq(message, msg_flags, ios)
      pid = fork_process(seq) if seq
      return become_forked(ios) if pid&.zero?

      # The forked process has its copies; the preloader's must go, or the core would never see
      # EOF on the new channel.
      ios.each(&:close)
      if pid
        begin
          # The child does the same; whichever runs first, its group exists before the core
          # hears of the process.
          Process.setpgid(pid, pid)
        rescue SystemCallError
          nil # it exited already: the reaping reports it
        end
        @children[pid] = seq
        AppManager.send_message(@control, "FORKED", { "seq" => seq, "pid" => pid })
      end
      false
    end

    # Process.fork, but 0 in the child as with fork(2), and nil, logged, when it failed: the
    # core then sees the new channel close without a READY.
    def fork_process(seq)
      Process.fork || 0
    rescue SystemCallError => e
      AppManager.log("FORK #{seq} failed: #{e.message}")
      nil
    end

    # The seq of a well-formed FORK message with its two descriptors; nil, logged, otherwise.
    def fork_seq(message, msg_flags, ios)
      tag, _, payload = message.partition(" ")
      data = HandshakeJSON.parse(payload) if tag == "FORK"
      seq = data["seq"] if data.is_a?(Hash)
      return seq if seq.is_a?(Integer) && [2, 3].include?(ios.length) && (msg_flags & TRUNCATED).zero?

      AppManager.log("ignoring a message that is not FORK with 2 or 3 fds: #{message[0, 80].inspect}")
      nil
    rescue HandshakeJSON::ParseError
      AppManager.log("ignoring an unreadable FORK message: #{message[0, 80].inspect}")
      nil
    end

    # In the forked process: drops what belongs to the preloader, takes the two received
    # descriptors at the preloader's fds 3 and 4, and starts watching for the core's death.
    # Anything failing here leaves no channel to report on, so it is logged and the process exits.
    def become_forked(ios)
      # Its own process group: the core stops a process by signalling its group, which takes
      # the app's own subprocesses along, and must not reach the preloader's.
      Process.setpgid(0, 0)
      Signal.trap("CHLD", "DEFAULT")
      @wake_r.close
      @wake_w.close
      # dup2 over fds 3 and 4 closes the preloader's channel and progress file in this process
      # only; Ruby's reopen marks the new fds close-on-exec.
      @control.reopen(ios[0])
      @progress.reopen(ios[1])
      if ios[2]
        # The process's own output pipe: the core logs its lines with its pid.
        $stdout.reopen(ios[2])
        $stderr.reopen(ios[2])
        # reopen resets the streams' sync flag (a logger set it on them in the preloader): lines
        # must reach the core as they are written, not when a buffer fills.
        $stdout.sync = true
        $stderr.sync = true
      end
      ios.each(&:close)
      # fork(2) already cleared the parent-death signal the preloader set: it is the preloader's
      # own, and the watchdog replaces it here.
      AppManager.watch_parent(Process.ppid, @core_pid)
      true
    rescue Exception => e # even an exit must not return into the preloader's loop
      AppManager.log("setting up a forked process failed:\n#{e.full_message(highlight: false)}")
      exit!(1)
    end

    # Reaps every exited child and reports the ones it forked, as EXITED.
    def reap
      loop do
        pid, status = Process.wait2(-1, Process::WNOHANG)
        return unless pid
        next unless @children.delete(pid)

        code = status.exitstatus || -status.termsig
        AppManager.send_message(@control, "EXITED", { "pid" => pid, "status" => code })
      end
    rescue Errno::ECHILD
      nil
    end
  end

  # Exits this forked process at once when its parent is neither the preloader nor the core:
  # the core died, and its subreaper duty passed to someone else (spawn.md, step 7).
  def watch_parent(preloader_pid, core_pid)
    watchdog = Thread.new do
      loop do
        sleep PARENT_CHECK_INTERVAL
        parent = Process.ppid
        next if parent == preloader_pid || parent == core_pid

        log("the core (pid #{core_pid}) is gone; exiting")
        exit!(1)
      end
    end
    watchdog.name = "appmanager watchdog"
  end

  # Step LISTEN: runs the starting hooks and sets up serving; returns the Worker.
  def listen(control, progress, app, config, forked)
    run_starting_hooks(forked)
    worker = Worker.new(control, progress, app, config)
    worker.listen
    worker
  end

  # Answers ERROR for a failed step when the core still listens; returns the exit status.
  def report_failure(control, step, exc)
    send_message(control, "ERROR", failure_message(step, exc))
    1
  rescue SystemCallError, IOError
    $stderr.write(exc.full_message(highlight: false))
    1
  end

  # Frees what loading left behind and packs what it kept, once, so that forked processes share
  # the most pages with the preloader. Measured with tests/apps/rails_app on Ruby 3.1: without
  # it a forked process starts with 7 MiB of its own memory, with a full GC 1.4 MiB; compaction
  # (40 ms, in the preloader only) saves a further 1.3 MiB per process once it has served, and
  # promoting objects to the old generation first (4 GCs) saved nothing more.
  def prepare_to_fork
    if Process.respond_to?(:warmup)
      Process.warmup # Ruby 3.3+: a full GC, compaction, promotion, and more
    else
      begin
        GC.compact # a full GC that also moves objects together
      rescue NotImplementedError
        GC.start # a platform without compaction
      end
    end
  end

  # Runs the handshake, then serves until the core closes the control channel.
  def main
    parent_pid = Process.ppid
    # The core handles Ctrl-C for the whole process group and stops us with EOF or TERM.
    Signal.trap("INT", "IGNORE")
    # Pipes to the core: each line must reach it when written, not when a buffer fills.
    $stdout.sync = true
    $stderr.sync = true

    control_fd = Integer(ENV.fetch("APPMANAGER_CONTROL_FD", "3"), 10)
    progress_fd = Integer(ENV.fetch("APPMANAGER_PROGRESS_FD", "4"), 10)
    begin
      control = Socket.for_fd(control_fd)
      control.autoclose = false
    rescue SystemCallError, ArgumentError => e
      log("fd #{control_fd} is not a control channel (#{e.message}); appmanager runs this file")
      return 2
    end

    step = "PREPARE"
    begin
      config = SpawnConfig.from_message(control.recv(MAX_MESSAGE))
      progress = prepare(config, control, progress_fd, parent_pid)
      step = "LOAD_APP"
      app = load_app(config)
      smart = config.spawn_method == "smart"
      prepare_to_fork if smart
    rescue Exception => e # exit and SyntaxError from config.ru are a failed LOAD_APP too
      return report_failure(control, step, e)
    end
    if smart
      payload = { "pid" => Process.pid, "app_type" => "rack", "protocol" => PROTOCOL }
      return 1 unless answer(control, "PRELOADER", payload)
      # Returns in the preloader at EOF, and in each forked process, then on its own channels.
      return 0 unless Preloader.new(control, progress, config.core_pid || parent_pid).run
    end
    begin
      worker = listen(control, progress, app, config, smart)
    rescue Exception => e # a hook fails like config.ru can
      return report_failure(control, "LISTEN", e)
    end
    # One request at a time, over whole connections too (handoff.md, "One request at a time").
    ready = { "pid" => Process.pid, "concurrency" => 1, "connections" => true, "protocol" => PROTOCOL }
    return 1 unless answer(control, "READY", ready)

    worker.serve
    run_stopping_hooks
    0
  end

  # Sends the handshake's answer; false, logged, when the core went away first.
  def answer(control, tag, payload)
    send_message(control, tag, payload)
    true
  rescue SystemCallError, IOError => e
    log("the core went away before #{tag}: #{e.message}")
    false
  end
end

# Passenger's hook API, so that apps written for Passenger keep working (spawn.md, "After-fork
# hooks"). Only when Passenger is not loaded already: it would run its own hooks.
unless defined?(PhusionPassenger)
  # The part of Passenger's public API that apps call at load time.
  module PhusionPassenger
    module_function

    def on_event(event, &block)
      AppManager.on_passenger_event(event, &block)
    end
  end
end

exit(AppManager.main) if $PROGRAM_NAME == __FILE__
