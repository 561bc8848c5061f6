# frozen_string_literal: true

# A modular Sinatra app (classic style would start its own server at exit) for the framework tests.

require "digest"
require "json"
require "sinatra/base"

class SinatraApp < Sinatra::Base
  # Errors reach the error handler below in every environment, not Sinatra's debug page.
  set :show_exceptions, false
  set :raise_errors, false

  get "/" do
    "Hello from Sinatra"
  end

  get "/pid" do
    Process.pid.to_s
  end

  get "/hello/:name" do
    "Hello, #{params[:name]}!"
  end

  get "/search" do
    content_type :json
    page = params.fetch(:page, "1").to_i
    JSON.generate("q" => params[:q], "page" => page, "script_name" => request.script_name)
  end

  post "/json" do
    data = JSON.parse(request.body.read)
    content_type :json
    JSON.generate("received" => data, "content_length" => request.content_length)
  end

  post "/form" do
    content_type :json
    JSON.generate("name" => params[:name], "tags" => params[:tags])
  end

  post "/upload" do
    upload = params[:file]
    halt 400, "no file" unless upload.is_a?(Hash) && upload[:tempfile]
    data = upload[:tempfile].read
    content_type :json
    JSON.generate(
      "filename" => upload[:filename], "size" => data.bytesize,
      "sha256" => Digest::SHA256.hexdigest(data), "note" => params[:note]
    )
  end

  get "/stream" do
    stream do |out|
      out << "first;"
      out << "second;"
      out << "third"
    end
  end

  get "/halt" do
    halt 403, "forbidden here"
  end

  get "/error" do
    raise "sinatra route failed"
  end

  not_found do
    "custom not found"
  end

  error do
    "custom error page: #{env["sinatra.error"].message}"
  end
end
